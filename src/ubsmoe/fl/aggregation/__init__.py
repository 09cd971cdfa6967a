"""Aggregation rules, one module per method; each is a pure function over tensors."""

from ubsmoe.fl.aggregation.fedavg import fedavg

__all__ = ["fedavg"]
