"""Method names and where their classes live; torch-free, so validating a configuration stays cheap.

A method is named in a configuration (`method: hetlora`) by one of the built-in names below, by a
name given to `register_method`, or by an import path `package.module:Class` (how a method defined
outside the package reaches a Flower SuperNode or a `ubsmoe compare` subprocess: the path travels in
the configuration, and the class is imported where it runs). Classes are imported only when a run
needs them (`method_class`).
"""

from __future__ import annotations

import importlib
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ubsmoe.methods.base import Method

__all__ = ["BUILTIN_METHODS", "UnknownMethodError", "is_method_name", "method_class", "method_names", "register_method"]

BUILTIN_METHODS: dict[str, str] = {
    "ubsmoe": "ubsmoe.methods.ubsmoe:UBSMoE",
    "ubsmoe-no-dmr": "ubsmoe.methods.ubsmoe:UBSMoENoDMR",
    "ubsmoe-no-pg": "ubsmoe.methods.ubsmoe:UBSMoENoPG",
    "ubsmoe-no-reg": "ubsmoe.methods.ubsmoe:UBSMoENoReg",
    "fedit": "ubsmoe.methods.fedit:FedIT",
    "hetlora": "ubsmoe.methods.hetlora:HetLoRA",
    "flexlora": "ubsmoe.methods.flexlora:FlexLoRA",
    "flora": "ubsmoe.methods.flora:FLoRA",
    "florist": "ubsmoe.methods.florist:FLoRIST",
    "smoe-naive": "ubsmoe.methods.smoe:SMoENaive",
    "smoe-llb": "ubsmoe.methods.smoe:SMoELLB",
    "a3smoe": "ubsmoe.methods.a3smoe:A3SMoE",
}
"""The methods of DESIGN 2.5 (UB-SMoE, its ablations and the baselines), in the order tables list them."""

_registered: dict[str, type[Method]] = {}
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class UnknownMethodError(ValueError):
    """A method name that is neither built in, registered, nor an importable `module:Class` path."""


def register_method(name: str, cls: type[Method]) -> type[Method]:
    """Make `cls` available as `method: <name>` in this process; returns `cls` (usable as a decorator helper).

    A registered name lives only in the process that registered it; a method that must also run in
    other processes (Flower SuperNodes, `ubsmoe compare` runs) is named by its import path instead.
    """
    from ubsmoe.methods.base import Method

    if not isinstance(cls, type) or not issubclass(cls, Method):
        raise TypeError(f"register_method({name!r}, ...): {cls!r} is not a subclass of ubsmoe.methods.Method")
    if name in BUILTIN_METHODS or ":" in name or not name:
        raise ValueError(f"register_method: {name!r} is a built-in method or not a plain name")
    _registered[name] = cls
    return cls


def method_names() -> tuple[str, ...]:
    """Every method name known in this process: the built-ins, then the registered ones."""
    return (*BUILTIN_METHODS, *_registered)


def is_method_name(name: str) -> bool:
    """Whether `name` can name a method: built in, registered, or shaped like `module:Class` (checked
    by importing only when the run needs the class)."""
    return name in BUILTIN_METHODS or name in _registered or bool(_IMPORT_PATH.match(name))


def method_class(name: str) -> type[Method]:
    """The class behind a method name or `module:Class` path; UnknownMethodError with the known names."""
    from ubsmoe.methods.base import Method

    if name in _registered:
        return _registered[name]
    path = BUILTIN_METHODS.get(name, name)
    if not isinstance(name, str) or not _IMPORT_PATH.match(path):
        raise UnknownMethodError(
            f"unknown method {name!r}; choose one of {', '.join(method_names())} or give a 'package.module:Class' path"
        )
    module_name, _, class_name = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise UnknownMethodError(f"method {name!r}: cannot import {path} ({error})") from None
    if not isinstance(cls, type) or not issubclass(cls, Method):
        raise UnknownMethodError(f"method {name!r}: {path} is not a subclass of ubsmoe.methods.Method")
    return cls
