"""Shared pieces of the script tests: a script of eval/ or training/ loaded as a module."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str, folder: str = "eval"):
    """``<folder>/<name>.py`` as a module, with its folder importable while it loads (some
    scripts import a sibling, e.g. the multi-concept experiment imports the digits experiment)."""
    where = str(ROOT / folder)
    spec = importlib.util.spec_from_file_location(name, ROOT / folder / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, where)
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(where)
    return mod
