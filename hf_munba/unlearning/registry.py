"""The method registry: a method is a short class, added with one ``@register_method`` line."""

from __future__ import annotations

from typing import Dict, List

__all__ = ["METHODS", "register_method", "get_method", "available_methods"]

METHODS: Dict[str, type] = {}


def register_method(name: str):
    def deco(cls):
        cls.name = name
        METHODS[name] = cls
        return cls
    return deco


def available_methods() -> List[str]:
    return sorted(METHODS)


def get_method(name: str) -> type:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown unlearning method {name!r}; choose one of {available_methods()}") from None
