"""training/train_munba_classifier.py: end to end in a subprocess, and every bad input fails fast."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "train_munba_classifier.py"
TOKEN = "hf_SeCrEtToKeN0123456789"


def _load_script():
    spec = importlib.util.spec_from_file_location("train_munba_classifier", SCRIPT)
    if spec.name in sys.modules:
        return sys.modules[spec.name]
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _write_imagefolder(root, per_class, size, classes=("cat", "dog", "fox")):
    """``root/<class>/<i>.png``: random RGB images, the layout of a local imagefolder dataset."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


COMMON = ["--per_device_train_batch_size", "32", "--learning_rate", "0.05", "--optim", "sgd",
          "--report_to", "none", "--use_cpu", "--disable_tqdm", "true", "--seed", "0"]


def test_script_end_to_end(tmp_path):
    out = tmp_path / "unlearned"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPT), "--model_name_or_path", "tiny-resnet", "--dataset", "digits",
           "--forget_classes", "3", "--method", "munba", "--output_dir", str(out), "--max_steps", "4",
           "--save_steps", "2", "--logging_steps", "1", "--hub_token", TOKEN, *COMMON]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert TOKEN not in res.stdout + res.stderr
    files = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pkl") and p.name != "optimizer.pt"
                and p.name != "scheduler.pt"]
    for p in files:  # the Hub token is never written anywhere
        assert TOKEN.encode() not in p.read_bytes(), p
    assert not [p for p in out.iterdir() if p.name.startswith(".staging")]
    record = json.loads((out / "unlearning_metrics.json").read_text())
    assert record["forget"] == {"classes": [3], "seed": 0} and record["method"] == "munba"
    card = (out / "README.md").read_text()
    assert "munba" in card and "acc_test" in card
    _check_card_metadata(card, record["metrics"], tmp_path)
    assert (out / "checkpoints" / "checkpoint-2" / "munba_state.json").exists()

    # round trip: the saved model reproduces the recorded test accuracy
    from transformers import AutoModelForImageClassification

    from hf_munba.classification.data import digits_dataset
    from hf_munba.evaluation.classification import predict_confidences

    model = AutoModelForImageClassification.from_pretrained(out, use_safetensors=True)
    pred, _, lab = predict_confidences(model, digits_dataset()["test"])
    assert 100.0 * (pred == lab).mean() == pytest.approx(record["metrics"]["acc_test"])


def _check_card_metadata(card, metrics, tmp_path):
    """The Hub metadata: license, pipeline tag, library, tags, no local base_model, and a
    model-index holding exactly the metrics the run measured; no local path, no placeholder link."""
    import yaml

    meta = yaml.safe_load(card.split("---")[1])
    assert meta["license"] == "apache-2.0" and meta["pipeline_tag"] == "image-classification"
    assert meta["library_name"] == "transformers" and "machine-unlearning" in meta["tags"]
    assert "base_model" not in meta  # tiny-resnet is no Hub id
    (entry,) = meta["model-index"]
    shown = {m["name"].split(" (")[0]: m["value"] for r in entry["results"] for m in r["metrics"]}
    expected = {"Acc D_f": "acc_forget", "Acc D_r": "acc_retain", "Acc D_t": "acc_test", "MIA-efficacy": "mia_efficacy"}
    assert set(shown) == set(expected)
    for name, key in expected.items():
        assert shown[name] == pytest.approx(metrics[key], abs=1e-4)
    assert str(tmp_path) not in card and "https://github.com/)" not in card


def test_model_card_base_model_only_for_hub_ids(tmp_path):
    from transformers import TrainingArguments

    from hf_munba.classification.model_io import classifier_model_card
    import yaml

    local = tmp_path / "my-classifier"
    local.mkdir()
    targs = TrainingArguments(output_dir=str(tmp_path / "out" / "checkpoints"), learning_rate=0.1, use_cpu=True)
    kw = dict(method="munba", forget={"classes": [3]}, munba_args={"method": "munba"},
              metrics={"acc_forget": 0.0, "acc_test": float("nan"), "runtime_s": 1.5}, training_args=targs)
    for base, expect in (("google/vit-base-patch16-224", "google/vit-base-patch16-224"), (str(local), None),
                         ("/abs/path/that/does/not/exist", None), ("tiny-vit", None)):
        card = str(classifier_model_card(base_model=base, dataset=str(tmp_path / "imgs"), **kw))
        meta = yaml.safe_load(card.split("---")[1])
        assert meta.get("base_model") == expect
        assert str(tmp_path) not in card and "/abs/path" not in card  # local paths by name only
        metrics = [m["name"] for r in meta["model-index"][0]["results"] for m in r["metrics"]]
        assert len(metrics) == 1 and metrics[0].startswith("Acc D_f")  # NaN (not measured) left out
        assert "| learning_rate | 0.1 |" in card and "| munba.method | munba |" in card


def _bad(tmp_path, capsys, *args):
    mod = _load_script()
    with pytest.raises(SystemExit) as e:
        mod.main([*args, *COMMON])
    assert e.value.code == 2
    return capsys.readouterr().err


def _image_dir(tmp_path, broken=False, empty=False):
    from PIL import Image

    root = tmp_path / "imgs"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        if not empty:
            Image.new("RGB", (8, 8)).save(root / c / "a.png")
    if broken:
        (root / "cat" / "b.png").write_bytes(b"not a png")
    return root


@pytest.mark.parametrize("case, msg", [
    ("no_data", "exactly one of --dataset digits or --train_dir"),
    ("bad_dataset", "unknown --dataset"),
    ("missing_dir", "does not exist"),
    ("empty_dir", "contains no images"),
    ("broken_image", "unreadable image"),
    ("method", "unknown unlearning method"),
    ("forget_loss", "unknown forget loss"),
    ("forget_class", "not labels of this dataset"),
    ("no_forget", "exactly one of forget classes"),
    ("nonempty_out", "not empty; pass --overwrite_output_dir"),
    ("fp16", "--fp16 needs a CUDA GPU"),
    ("deepspeed", "DeepSpeed is not supported"),
    ("model_missing", "is not a folder"),
    ("model_bin_only", "no .safetensors weights"),
    ("label_count", "the model has 3 labels but the dataset has 10 classes"),
    ("no_processor", "needs a model folder holding its image processor"),
    ("lr_scheduler", "bogus"),
    ("unknown_flag", "--no_such_flag"),
    ("bad_number", "--learning_rate"),
    ("bad_resume", "--resume_from_checkpoint"),
])
def test_bad_inputs_fail_before_model_load(tmp_path, capsys, monkeypatch, case, msg):
    out = tmp_path / "out"
    args = {"--model_name_or_path": "tiny-resnet", "--dataset": "digits", "--forget_classes": "3",
            "--output_dir": str(out)}
    extra = []
    if case == "no_data":
        del args["--dataset"]
    elif case == "bad_dataset":
        args["--dataset"] = "cifar10"
    elif case in ("missing_dir", "empty_dir", "broken_image"):
        del args["--dataset"]
        args["--train_dir"] = str(tmp_path / "nope") if case == "missing_dir" else str(
            _image_dir(tmp_path, broken=case == "broken_image", empty=case == "empty_dir"))
    elif case == "method":
        args["--method"] = "unlearn_everything"
    elif case == "forget_loss":
        args["--forget_loss"] = "mse"
    elif case == "forget_class":
        args["--forget_classes"] = "11"
    elif case == "no_forget":
        del args["--forget_classes"]
    elif case == "nonempty_out":
        out.mkdir()
        (out / "keep.txt").write_text("x")
    elif case == "fp16":
        extra = ["--fp16"]
    elif case == "deepspeed":
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    elif case == "model_missing":
        args["--model_name_or_path"] = str(tmp_path / "nomodel")
    elif case == "model_bin_only":
        m = tmp_path / "m"
        m.mkdir()
        (m / "config.json").write_text("{}")
        (m / "pytorch_model.bin").write_bytes(b"")
        args["--model_name_or_path"] = str(m)
    elif case == "lr_scheduler":
        extra = ["--lr_scheduler_type", "bogus"]
    elif case == "unknown_flag":
        extra = ["--no_such_flag", "1"]
    elif case == "bad_number":
        extra = ["--learning_rate", "fast"]
    elif case == "bad_resume":
        extra = ["--resume_from_checkpoint", str(tmp_path / "no_checkpoint")]
    elif case in ("label_count", "no_processor"):
        m = tmp_path / "m"
        m.mkdir()
        (m / "config.json").write_text(json.dumps({"id2label": {"0": "a", "1": "b", "2": "c"}}))
        (m / "model.safetensors").write_bytes(b"")
        args["--model_name_or_path"] = str(m)
        if case == "no_processor":
            del args["--dataset"]
            args["--train_dir"] = str(_image_dir(tmp_path))
            args["--forget_classes"] = "cat"
    argv = [x for kv in args.items() for x in kv] + extra
    err = _bad(tmp_path, capsys, *argv)
    assert msg in err
    # one clear line: no usage block (over a hundred lines of flags), no traceback
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err[:2000]
    if case == "nonempty_out":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:  # nothing written: not even an empty output folder
        assert not out.exists()


def test_bad_input_from_the_command_line_is_one_line(tmp_path):
    """The real entry point (a subprocess): an unknown --lr_scheduler_type (TrainingArguments'
    own ValueError) gives one ``error:`` line, exit status 2, and no output folder."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(SCRIPT), "--model_name_or_path", "tiny-resnet", "--dataset",
                          "digits", "--forget_classes", "3", "--output_dir", str(out),
                          "--lr_scheduler_type", "bogus"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) <= 3 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert [ln for ln in lines if ln.startswith("error: ")] and "bogus" in res.stderr
    assert not out.exists()


def test_imagefolder_with_image_processor_and_class_names(tmp_path):
    """A local imagefolder, a saved ViT with its image processor, forgetting a class by name."""
    from transformers import ViTImageProcessor

    from hf_munba.testing import tiny_vit_classifier

    _write_imagefolder(tmp_path / "imgs", per_class=6, size=8)
    model = tiny_vit_classifier(num_labels=3, num_channels=3, label_names=["cat", "dog", "fox"])
    model.save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 8, "width": 8}).save_pretrained(tmp_path / "vit")
    out = tmp_path / "out"
    mod = _load_script()
    mod.main(["--model_name_or_path", str(tmp_path / "vit"), "--train_dir", str(tmp_path / "imgs"),
              "--test_size", "0.34", "--forget_classes", "cat", "--output_dir", str(out),
              "--max_steps", "2", *COMMON])
    record = json.loads((out / "unlearning_metrics.json").read_text())
    assert record["forget"]["classes"] == [0]
    assert (out / "preprocessor_config.json").exists() and (out / "config.json").exists()


def test_clip_zero_shot_through_the_script(tmp_path):
    """A CLIPModel folder + --clip_zero_shot: class prompts from folder names, text encoder trained."""
    from hf_munba.classification.clip_zero_shot import CLIPZeroShotClassifier
    from hf_munba.testing import tiny_clip_model, tiny_clip_processor

    _write_imagefolder(tmp_path / "imgs", per_class=4, size=32)
    tiny_clip_model().save_pretrained(tmp_path / "clip")
    tiny_clip_processor().save_pretrained(tmp_path / "clip")
    out = tmp_path / "out"
    _load_script().main(["--model_name_or_path", str(tmp_path / "clip"), "--clip_zero_shot",
                         "--clip_train_encoder", "text", "--train_dir", str(tmp_path / "imgs"),
                         "--test_size", "0.25", "--forget_classes", "dog", "--output_dir", str(out),
                         "--max_steps", "2", *COMMON])
    model = CLIPZeroShotClassifier.from_pretrained(str(out))
    assert model.class_names == ["cat", "dog", "fox"] and model.train_encoder == "text"
    assert json.loads((out / "unlearning_metrics.json").read_text())["forget"]["classes"] == [1]


@pytest.mark.parametrize("method", ["be", "iu"])
def test_the_script_runs_the_paper_baselines(tmp_path, method):
    """``--method be`` saves a model with the original 10 classes (its shadow class is gone) and
    ``--method iu`` (no training step) saves its one edit; both load with ``from_pretrained``."""
    from safetensors import safe_open
    from transformers import AutoModelForImageClassification

    out = tmp_path / method
    _load_script().main(["--model_name_or_path", "tiny-resnet", "--dataset", "digits", "--forget_classes", "3",
                         "--method", method, "--output_dir", str(out), "--max_steps", "3",
                         "--iu_fisher_batches", "4", *COMMON])
    record = json.loads((out / "unlearning_metrics.json").read_text())
    assert record["method"] == method and record["metrics"]["runtime_s"] >= 0
    model = AutoModelForImageClassification.from_pretrained(out, use_safetensors=True)
    assert model.config.num_labels == 10
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(model.state_dict())  # no shadow row, nothing missing
