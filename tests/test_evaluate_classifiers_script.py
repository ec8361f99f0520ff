"""eval/evaluate_classifiers.py: tables for saved models, Avg. Gap against the retrained one."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from hf_munba.testing import tiny_resnet_classifier

SCRIPT = Path(__file__).resolve().parents[1] / "eval" / "evaluate_classifiers.py"


def _main():
    spec = importlib.util.spec_from_file_location("evaluate_classifiers", SCRIPT)
    if spec.name not in sys.modules:
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[spec.name].main


def test_evaluate_saved_models(tmp_path, capsys):
    for name, seed in (("retrain", 0), ("munba", 1)):
        tiny_resnet_classifier(seed=seed).save_pretrained(tmp_path / name)
    (tmp_path / "munba" / "unlearning_metrics.json").write_text(json.dumps({"metrics": {"runtime_s": 1.5}}))
    _main()(["--dataset", "digits", "--forget_classes", "3", "--models", f"munba={tmp_path / 'munba'}",
             "--retrain", str(tmp_path / "retrain"), "--output_dir", str(tmp_path / "eval")])
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert res["retrain"]["avg_gap"] == 0.0 and res["munba"]["avg_gap"] > 0.0
    assert res["munba"]["runtime_s"] == 1.5
    assert 0.0 <= res["munba"]["mia_efficacy"] <= 100.0
    assert (tmp_path / "eval" / "results.png").stat().st_size > 0
    assert "| munba |" in capsys.readouterr().out


@pytest.mark.parametrize("argv, msg", [
    (["--models", "munba"], "name=path"),
    (["--models", "m=/nonexistent"], "is not a folder"),
    (["--models", "m=tiny-resnet", "--retrain", "out/retrain"], "--method retrain"),
    (["--models", "m=tiny-resnet", "--batch_size", "many"], "--batch_size"),
])
def test_bad_arguments(tmp_path, capsys, argv, msg):
    with pytest.raises(SystemExit) as e:
        _main()(["--dataset", "digits", "--forget_classes", "3", "--output_dir", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err
    assert msg in err
    assert e.value.code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1  # no usage block
    assert not (tmp_path / "out").exists()
