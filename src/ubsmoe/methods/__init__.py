"""Federated fine-tuning methods: one module per method, one interface (`Method`), one registry.

`method_class(name)` gives the class behind a configuration's `method` (a built-in name, a name
given to `register_method`, or a `package.module:Class` path); `Method.from_config(config)` makes
the instance a run uses. docs/extending.md walks through adding a method.

Built in (DESIGN 2.5): `ubsmoe` and its ablations (`ubsmoe.methods.ubsmoe`), `smoe-naive` and
`smoe-llb` (`smoe`), `a3smoe`, `fedit`, and the heterogeneous-rank baselines `hetlora`, `flexlora`,
`flora`, `florist` (their shared half is `ubsmoe.methods.rank`). The registry is torch-free; the
method modules import torch.
"""

from ubsmoe.methods.registry import BUILTIN_METHODS, UnknownMethodError, method_class, method_names, register_method

__all__ = [
    "BUILTIN_METHODS",
    "Aggregate",
    "Method",
    "MethodOptionsError",
    "UnknownMethodError",
    "method_class",
    "method_names",
    "register_method",
]


def __getattr__(name: str):
    # Method and its helpers import torch: only when asked for, so `import ubsmoe.methods` stays light.
    if name in ("Aggregate", "Method", "MethodOptionsError"):
        from ubsmoe.methods import base

        return getattr(base, name)
    raise AttributeError(f"module 'ubsmoe.methods' has no attribute {name!r}")
