"""The package layout users rely on: old module paths still import (with a warning) for one
release, and ``import hf_munba`` stays light (no front end, no test factories)."""

import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from hf_munba._moved_modules import MOVED

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_module_path_is_the_new_module_and_warns(old):
    new = importlib.import_module(f"hf_munba.{MOVED[old]}")
    sys.modules.pop(f"hf_munba.{old}", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mod = importlib.import_module(f"hf_munba.{old}")
    assert mod is new
    assert any(issubclass(w.category, FutureWarning) and MOVED[old] in str(w.message)
               for w in caught)


def test_every_moved_target_exists_and_no_old_file_is_left():
    for old, new in MOVED.items():
        assert (ROOT / "hf_munba" / (new.replace(".", "/") + ".py")).is_file(), new
        assert not (ROOT / "hf_munba" / f"{old}.py").exists(), old


def test_an_unknown_module_is_still_an_import_error():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("hf_munba.no_such_module")


def test_import_hf_munba_loads_no_front_end_and_no_test_factories():
    code = ("import sys, hf_munba, hf_munba.unlearning, hf_munba.bargaining; "
            "print(' '.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         check=True).stdout.split()
    heavy = [m for m in out if m.split(".")[0] in ("diffusers", "transformers", "peft",
                                                    "accelerate", "datasets")]
    assert heavy == []
    assert not [m for m in out if m.startswith("hf_munba.testing")]
    assert not [m for m in out if m.startswith(("hf_munba.diffusion", "hf_munba.classification"))]


def test_every_public_name_of_hf_munba_resolves():
    import hf_munba

    for name in hf_munba.__all__:
        assert getattr(hf_munba, name) is not None, name
    assert hf_munba.train_sd.__name__ == "train"
