"""scikit-learn is an extra (``hf_munba[eval]``): the classifier script trains without it and
says what to install when a step really needs it (the digits data, the membership attack).

A missing package is simulated with ``sys.modules['sklearn'] = None``: every ``import sklearn``
then raises ImportError, as on a machine without it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "training" / "train_munba_classifier.py"
EVAL = ROOT / "eval" / "evaluate_classifiers.py"
HINT = "pip install 'hf_munba[eval]'"
COMMON = ["--per_device_train_batch_size", "8", "--learning_rate", "0.05", "--optim", "sgd",
          "--report_to", "none", "--use_cpu", "--disable_tqdm", "true", "--seed", "0"]


def _run_without_sklearn(script, args):
    code = ("import runpy, sys; sys.modules['sklearn'] = None; "
            "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code, str(script), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=str(ROOT))


def test_script_trains_on_an_imagefolder_without_sklearn(tmp_path):
    """Training needs no scikit-learn; the final evaluation leaves out MIA-efficacy and says why."""
    from transformers import ViTImageProcessor

    from hf_munba.testing import tiny_vit_classifier
    from test_train_classifier_script import _write_imagefolder

    _write_imagefolder(tmp_path / "imgs", per_class=4, size=8)
    tiny_vit_classifier(num_labels=3, num_channels=3, label_names=["cat", "dog", "fox"]).save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 8, "width": 8}).save_pretrained(tmp_path / "vit")
    out = tmp_path / "out"
    res = _run_without_sklearn(TRAIN, ["--model_name_or_path", tmp_path / "vit", "--train_dir", tmp_path / "imgs",
                                       "--test_size", "0.25", "--forget_classes", "cat", "--output_dir", out,
                                       "--max_steps", "2", *COMMON])
    assert res.returncode == 0, res.stderr[-3000:]
    assert HINT in res.stderr and "MIA-efficacy" in res.stderr
    metrics = json.loads((out / "unlearning_metrics.json").read_text())["metrics"]
    assert {"acc_forget", "acc_retain", "acc_test"} <= set(metrics) and "mia_efficacy" not in metrics


def _load(script, name, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, script)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, mod)  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("script, argv, what", [
    (TRAIN, ["--model_name_or_path", "tiny-resnet", "--dataset", "digits", "--forget_classes", "3", *COMMON],
     "--dataset digits"),
    (EVAL, ["--dataset", "digits", "--forget_classes", "3", "--models", "m=tiny-resnet"], "MIA-efficacy"),
])
def test_steps_that_need_sklearn_say_what_to_install(tmp_path, capsys, monkeypatch, script, argv, what):
    """One line naming the step and the extra, before any model work; nothing written."""
    monkeypatch.setitem(sys.modules, "sklearn", None)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        _load(script, f"no_sklearn_{script.stem}", monkeypatch).main([*argv, "--output_dir", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert what in err and HINT in err
    assert not out.exists()


def test_library_calls_that_need_sklearn_raise_one_clear_error(monkeypatch):
    from hf_munba.classification.data import digits_dataset
    from hf_munba.evaluation.classification import mia_efficacy

    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(ImportError, match=r"digits dataset needs scikit-learn.*hf_munba\[eval\]"):
        digits_dataset()
    with pytest.raises(ImportError, match=r"MIA-efficacy needs scikit-learn.*hf_munba\[eval\]"):
        mia_efficacy([0.9, 0.8], [0.1, 0.2], [0.5])
