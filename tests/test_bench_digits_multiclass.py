"""eval/bench_digits_multiclass.py: per-class players vs pooled vs sequential, end to end (tiny)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    sys.path.insert(0, str(ROOT / "eval"))  # it reuses bench_digits_unlearning's pieces
    spec = importlib.util.spec_from_file_location("bench_digits_multiclass",
                                                  ROOT / "eval" / "bench_digits_multiclass.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_mode_runs_and_reports_each_class(tmp_path):
    mod = _load()
    table = mod.main(["--seeds", "0", "--rows", "munba", "--original_epochs", "0.05", "--epochs", "0.05",
                      "--bn_on_retain", "--output_dir", str(tmp_path)])
    modes = ("per_class", "pooled", "sequential")
    assert set(table) == {"original", "retrain", *(f"munba {m}" for m in modes),
                          *(f"munba {m} +BN(D_r)" for m in modes)}
    for row in table.values():
        assert {"acc_forget_3", "acc_forget_7", "acc_retain", "acc_test_kept", "acc_test"} <= set(row)
    saved = json.loads((tmp_path / "digits_multiclass.json").read_text())
    assert saved["forget_classes"] == [3, 7] and len(saved["runs"]["munba pooled"]) == 1
    assert "Acc D_f digit 7" in (tmp_path / "digits_multiclass.md").read_text()


@pytest.mark.parametrize("argv", [["--forget_classes", "3"], ["--forget_classes", "3,3"],
                                  ["--modes", "joint"], ["--rows", "weighted-x"]])
def test_bad_arguments_exit(argv):
    with pytest.raises(SystemExit):
        _load().parse_args(argv)
