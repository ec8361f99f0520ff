"""The method registry: a method is a short class, added with one ``@register_method`` line."""

from __future__ import annotations

import importlib
from typing import Dict, List, Optional

__all__ = ["METHODS", "register_method", "get_method", "available_methods"]

METHODS: Dict[str, type] = {}


def register_method(name: str):
    def deco(cls):
        cls.name = name
        METHODS[name] = cls
        return cls
    return deco


def available_methods(front_end: Optional[str] = None) -> List[str]:
    """Registered method names; with ``front_end`` ("diffusion", "classification") only the
    methods that front end can run."""
    _load_builtin()
    return sorted(n for n, m in METHODS.items()
                  if front_end is None or front_end in getattr(m, "front_ends", (front_end,)))


def get_method(name: str) -> type:
    _load_builtin()
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown unlearning method {name!r}; choose one of {available_methods()}") from None


_BUILTIN = ("hf_munba.unlearning.methods", "hf_munba.classification.methods")


def _load_builtin() -> None:
    """The built-in methods register on import; a lookup must see them all, whichever front
    end the caller imported (a name-only import: no module imports the other at load time)."""
    for module in _BUILTIN:
        importlib.import_module(module)
