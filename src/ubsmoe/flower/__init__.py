"""UB-SMoE as a Flower app (flwr 1.42): ServerApp, ClientApp and Strategy over the same federated core.

`ubsmoe.flower.server_app:app` and `ubsmoe.flower.client_app:app` are the app's components
(`[tool.flwr.app.components]` in pyproject.toml); `ubsmoe.flower.deploy` runs a SuperLink and several
SuperNodes on one machine. Importing this package needs `flwr` (`pip install -e ".[flower]"`).
"""
