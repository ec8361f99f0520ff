"""The method registry: a method is a short class, added with one ``@register_method`` line.

The registry imports no method: each front end's methods register when their module is imported.
``hf_munba.unlearning`` imports the shared methods (:mod:`.methods`); ``hf_munba.classification``
imports its classifier-only ones. So the dependency runs one way, front end -> registry, with no
import or call cycle back.
"""

from __future__ import annotations

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
    return sorted(n for n, m in METHODS.items()
                  if front_end is None or front_end in getattr(m, "front_ends", (front_end,)))


def get_method(name: str) -> type:
    try:
        return METHODS[name]
    except KeyError:
        hint = ("" if any(getattr(m, "front_ends", ()) == ("classification",) for m in METHODS.values())
                else " (classifier-only methods register when hf_munba.classification is imported)")
        raise ValueError(f"unknown unlearning method {name!r}; choose one of "
                         f"{available_methods()}{hint}") from None
