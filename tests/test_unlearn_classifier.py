"""hf_munba.unlearn_classifier and the script with several forget classes: per class vs pooled."""

import json

import pytest
import torch

import hf_munba
from hf_munba.classification.data import digits_dataset
from hf_munba.testing import tiny_resnet_classifier, tiny_vit_classifier
from test_train_classifier_script import COMMON, _load_script
from trainer_helpers import params_vector

FAST = dict(max_steps=2, per_device_train_batch_size=32, learning_rate=0.05, optim="sgd",
            use_cpu=True, disable_tqdm=True, logging_steps=1, seed=0)


@pytest.fixture(scope="module")
def digits():
    """A stratified quarter of digits (both splits): every class, a quarter of the evaluation."""
    from datasets import DatasetDict

    d = digits_dataset()
    return DatasetDict(train=d["train"].select(range(0, len(d["train"]), 4)),
                       test=d["test"].select(range(0, len(d["test"]), 4)))


def test_docstring_example_runs():
    import doctest

    import hf_munba.classification.unlearn as unlearn

    result = doctest.testmod(unlearn, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 4 and result.failed == 0


def test_api_end_to_end_saves_model_card_metrics_and_per_class_state(tmp_path, digits):
    out = tmp_path / "unlearned"
    model, metrics = hf_munba.unlearn_classifier(
        tiny_resnet_classifier(num_labels=10), digits, forget_classes=[3, 7],
        forget_players="per_class", output_dir=str(out),
        save_strategy="steps", save_steps=2, return_metrics=True, **FAST)
    record = json.loads((out / "unlearning_metrics.json").read_text())
    assert record["forget"] == {"classes": [3, 7], "seed": 0, "players": "per_class",
                                "concepts": {"3": [3], "7": [7]}}
    assert record["method"] == "munba" and record["metrics"] == metrics
    assert {"acc_forget", "acc_forget_3", "acc_forget_7", "acc_retain", "acc_test",
            "mia_efficacy"} <= set(metrics)
    assert "munba" in (out / "README.md").read_text()
    ckpt = out / "checkpoints" / "checkpoint-2"
    assert json.loads((ckpt / "munba_state.json").read_text())["forget_names"] == ["3", "7"]
    logs = json.loads((ckpt / "trainer_state.json").read_text())["log_history"][0]
    assert {"loss_forget_3", "loss_forget_7", "munba/weight_forget_3", "munba/cos_forget_3_forget_7"} <= set(logs)
    assert not [p for p in out.iterdir() if p.name.startswith(".staging")]
    from transformers import AutoModelForImageClassification

    saved = AutoModelForImageClassification.from_pretrained(out, use_safetensors=True)
    assert torch.equal(params_vector(saved), params_vector(model))
    # the returned model reloads with the recorded accuracy, from a path too (nothing written)
    again = hf_munba.unlearn_classifier(str(out), digits, forget_classes="3,7", forget_players="pooled",
                                        method="weighted", **FAST)
    assert not torch.equal(params_vector(again), params_vector(model))


def test_per_class_and_pooled_bargain_differently(digits):
    per_class = hf_munba.unlearn_classifier(tiny_resnet_classifier(num_labels=10), digits,
                                            forget_classes=[3, 7], forget_players="per_class",
                                            **FAST)
    pooled = hf_munba.unlearn_classifier(tiny_resnet_classifier(num_labels=10), digits,
                                         forget_classes=[3, 7], **FAST)  # pooled: the default
    explicit = hf_munba.unlearn_classifier(tiny_resnet_classifier(num_labels=10), digits,
                                           forget_classes=[3, 7], forget_players="pooled", **FAST)
    assert not torch.equal(params_vector(per_class), params_vector(pooled))
    assert torch.equal(params_vector(explicit), params_vector(pooled))


def test_named_concepts_from_an_image_column(tmp_path):
    """A dict name -> classes on a Dataset with ``image`` + ``label`` (ClassLabel) columns,
    transformed by the image processor given; no test split, so no test metrics."""
    import numpy as np
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage
    from transformers import ViTImageProcessor

    rng = np.random.default_rng(0)
    names = ["cat", "dog", "fox", "owl"]
    images = [PILImage.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in range(24)]
    ds = Dataset.from_dict({"image": images, "label": [i % 4 for i in range(24)]},
                           features=Features({"image": Image(), "label": ClassLabel(names=names)}))
    processor = ViTImageProcessor(size={"height": 8, "width": 8})
    model, metrics = hf_munba.unlearn_classifier(
        tiny_vit_classifier(num_labels=4, num_channels=3), ds,
        forget_classes={"pets": ["cat", "dog"], "wild": ["fox"]}, image_processor=processor,
        output_dir=str(tmp_path / "out"), return_metrics=True, **{**FAST, "per_device_train_batch_size": 4})
    assert {"acc_forget_pets", "acc_forget_wild", "acc_forget", "acc_retain"} <= set(metrics)
    assert "acc_test" not in metrics and "mia_efficacy" not in metrics
    record = json.loads((tmp_path / "out" / "unlearning_metrics.json").read_text())
    assert record["forget"]["concepts"] == {"pets": [0, 1], "wild": [2]}
    assert (tmp_path / "out" / "preprocessor_config.json").exists()


@pytest.mark.parametrize("kwargs, message", [
    (dict(forget_classes=[3], learning_rat=0.1), "did you mean 'learning_rate'"),
    (dict(forget_fraction=0.1, forget_players="per_class"), "need forget classes"),
    (dict(forget_classes=[3, 3]), "repeated"),
    (dict(forget_classes={"a": [3], "b": [3, 7]}), "more than one concept"),
    (dict(forget_classes={"a": [3], "b b": [7]}), "letters, digits"),
    (dict(forget_classes={"a": [3], "b": [7]}, forget_players="pooled"), "one player per concept"),
    (dict(forget_classes=[3, 7], forget_players="per_class", method="ft"), "uses no forget set"),
    (dict(forget_classes=[3, 7], forget_players="several"), "forget players must be"),
    (dict(forget_classes=["three"]), "unknown forget class"),
    (dict(forget_classes=[3, 12]), "not labels of this dataset"),
    (dict(forget_indices=[0, 10**6]), "out of range"),
    (dict(), "needs a forget set"),
    (dict(forget_classes=[3], forget_fraction=0.1), "exactly one"),
])
def test_bad_input_is_one_clear_error_before_any_model_work(digits, kwargs, message):
    with pytest.raises(ValueError, match=message):  # the model path is never looked at
        hf_munba.unlearn_classifier("/nonexistent/model", digits, **kwargs)


def test_bad_datasets_are_one_clear_error(digits):
    with pytest.raises(ValueError, match="'train' split"):
        hf_munba.unlearn_classifier("/nonexistent", {"test": digits["test"]}, forget_classes=[3])
    with pytest.raises(ValueError, match="'labels'"):
        hf_munba.unlearn_classifier("/nonexistent", digits["train"].remove_columns("labels"),
                                    forget_classes=[3])


def _script(tmp_path, name, *extra):
    out = tmp_path / name
    _load_script().main(["--model_name_or_path", "tiny-resnet", "--dataset", "digits",
                         "--forget_classes", "3,7", "--output_dir", str(out), "--max_steps", "2",
                         "--save_steps", "2", "--logging_steps", "1", *extra, *COMMON])
    record = json.loads((out / "unlearning_metrics.json").read_text())
    ckpt = out / "checkpoints" / "checkpoint-2"
    return (record, json.loads((ckpt / "munba_state.json").read_text()),
            json.loads((ckpt / "trainer_state.json").read_text())["log_history"][0])


def test_script_several_classes_pooled_by_default_and_per_class(tmp_path, capsys):
    record, state, logs = _script(tmp_path, "per_class", "--forget_players", "per_class")
    assert record["forget"]["players"] == "per_class" and state["forget_names"] == ["3", "7"]
    assert "munba/weight_forget_7" in logs and "acc_forget_7" in record["metrics"]
    record, state, logs = _script(tmp_path, "pooled")  # the default
    assert record["forget"]["players"] == "pooled" and "forget_names" not in state
    assert "munba/weight_forget" in logs and "munba/weight_forget_7" not in logs
    assert "acc_forget_3" in record["metrics"]  # each class's forgetting is still reported
    # a method without D_f only leaves the classes out of D_r (the retrain reference)
    record, state, _ = _script(tmp_path, "retrain", "--method", "retrain")
    assert record["forget"]["players"] == "pooled"
    mod = _load_script()
    for extra, message in ((["--forget_classes", "3,7", "--forget_players", "per_class", "--method", "ft"],
                            "uses no forget set"),
                           (["--forget_fraction", "0.1", "--forget_players", "per_class"], "need forget classes"),
                           (["--forget_classes", "3,7", "--forget_players", "all"], "--forget_players must")):
        with pytest.raises(SystemExit) as e:
            mod.main(["--model_name_or_path", "tiny-resnet", "--dataset", "digits",
                      "--output_dir", str(tmp_path / "bad"), *extra, *COMMON])
        assert e.value.code == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()
