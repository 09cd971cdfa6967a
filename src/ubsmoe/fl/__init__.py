"""Federated core: client update, aggregation rules, server round logic (functions over plain payloads)."""
