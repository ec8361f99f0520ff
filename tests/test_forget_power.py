"""The forget player's default power follows the forget set: 1 for classes, 0.2 for samples."""

import logging

import numpy as np
import pytest
import torch

from hf_munba.classification.data import InMemoryDataset
from hf_munba.classification.forget_power import (CLASS_FORGET_POWER, SAMPLE_FORGET_POWER,
                                                  dataset_labels, forget_set_kind)
from hf_munba.classification.trainer import MunbaArguments, MunbaTrainer
from hf_munba.testing import tiny_resnet_classifier
from trainer_helpers import params_vector, targs, tiny_classification_data


def _samples_split():
    """Forget every fourth sample of every class (classes kept in D_r): random forgetting."""
    forget, retain = tiny_classification_data()
    cols = {k: torch.cat([forget.columns[k], retain.columns[k]]) for k in forget.columns}
    pick = torch.arange(len(cols["labels"])) % 4 == 1
    return (InMemoryDataset({k: v[pick] for k, v in cols.items()}),
            InMemoryDataset({k: v[~pick] for k, v in cols.items()}))


class _TorchDataset(torch.utils.data.Dataset):  # exposes no label column
    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]


def _trainer(tmp_path, forget, retain, munba_args=None, **kw):
    return MunbaTrainer(model=tiny_resnet_classifier(num_labels=4), args=targs(tmp_path, **kw),
                        train_dataset=retain, forget_dataset=forget, munba_args=munba_args)


def test_the_kind_is_read_from_the_labels():
    from datasets import Dataset

    forget, retain = tiny_classification_data()
    assert forget_set_kind([forget], retain) == "classes"
    assert forget_set_kind(list(_samples_split()[:1]), _samples_split()[1]) == "samples"
    # datasets.Dataset, also under a transform that would fail on a labels-only batch
    ds = Dataset.from_dict({"labels": [0, 1, 2, 0], "x": [1, 2, 3, 4]})
    broken = ds.with_transform(lambda b: {"y": b["missing"]})
    assert dataset_labels(broken).tolist() == [0, 1, 2, 0]
    assert forget_set_kind([ds.select([0, 3])], broken.select([1, 2])) == "classes"
    assert forget_set_kind([ds.select([0])], ds.select([1, 2, 3])) == "samples"
    assert dataset_labels(ds.rename_column("labels", "label")).tolist() == [0, 1, 2, 0]
    # several concepts: samples as soon as one concept shares a class with D_r
    assert forget_set_kind([forget, ds.select([1])], retain) == "samples"
    assert forget_set_kind([_TorchDataset(forget)], retain) is None
    assert forget_set_kind([forget], _TorchDataset(retain)) is None


def test_trainer_picks_the_power_and_records_it(tmp_path):
    forget, retain = tiny_classification_data()
    classes = _trainer(tmp_path / "c", forget, retain)
    assert classes.munba_args.bargaining_power_forget == CLASS_FORGET_POWER
    assert classes.method.powers() is None  # the paper's symmetric game, exactly
    f, r = _samples_split()
    samples = _trainer(tmp_path / "s", f, r, max_steps=1)
    assert samples.munba_args.bargaining_power_forget == SAMPLE_FORGET_POWER
    samples.train()
    assert samples.state.log_history[0]["munba/power_forget"] == SAMPLE_FORGET_POWER
    samples.save_model(str(tmp_path / "saved"))
    saved = MunbaArguments.from_json_string((tmp_path / "saved" / "munba_args.json").read_text())
    assert saved.bargaining_power_forget == SAMPLE_FORGET_POWER
    # a method without bargaining powers leaves the option alone
    assert _trainer(tmp_path / "w", f, r, MunbaArguments(method="weighted")) \
        .munba_args.bargaining_power_forget is None


def test_the_default_on_samples_is_the_explicit_power_and_a_given_power_wins(tmp_path):
    f, r = _samples_split()
    runs = {}
    for name, args in [("default", None), ("explicit", MunbaArguments(bargaining_power_forget=0.2)),
                       ("one", MunbaArguments(bargaining_power_forget=1.0))]:
        tr = _trainer(tmp_path / name, f, r, args, max_steps=2)
        tr.train()
        runs[name] = (tr.munba_args.bargaining_power_forget, params_vector(tr.model))
    assert runs["one"][0] == 1.0  # given explicitly: kept, even for samples
    assert torch.equal(runs["default"][1], runs["explicit"][1])
    assert not torch.equal(runs["default"][1], runs["one"][1])


def test_unreadable_labels_fall_back_to_the_class_default_with_a_warning(tmp_path, caplog):
    forget, retain = tiny_classification_data()
    with caplog.at_level(logging.WARNING, logger="hf_munba.classification.forget_power"):
        tr = _trainer(tmp_path, _TorchDataset(forget), retain)
    assert tr.munba_args.bargaining_power_forget == CLASS_FORGET_POWER
    assert "bargaining_power_forget=0.2" in caplog.text


def test_bad_power_is_still_one_clear_error():
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="bargaining_power_forget"):
            MunbaArguments(bargaining_power_forget=bad)
    assert np.isclose(MunbaArguments(bargaining_power_forget=0.5).bargaining_power_forget, 0.5)


def test_the_sd_config_keeps_the_symmetric_game():
    from hf_munba.diffusion.config import SDUnlearningConfig

    base = dict(pretrained_model_name_or_path="some/model")
    assert SDUnlearningConfig(**base).bargaining_power_forget == 1.0  # a concept: like a class
    assert SDUnlearningConfig(**base, bargaining_power_forget=0.3).bargaining_power_forget == 0.3
    cfg = SDUnlearningConfig(**base)
    assert SDUnlearningConfig.from_dict(cfg.to_dict()).bargaining_power_forget == 1.0


def test_unlearn_classifier_records_the_power_it_ran(tmp_path):
    """Random samples through the one-call API: the model card and munba_args.json say 0.2."""
    import hf_munba
    from datasets import DatasetDict

    from hf_munba.classification.data import digits_dataset

    d = digits_dataset()
    small = DatasetDict(train=d["train"].select(range(0, len(d["train"]), 6)),
                        test=d["test"].select(range(0, len(d["test"]), 6)))
    out = tmp_path / "out"
    hf_munba.unlearn_classifier(tiny_resnet_classifier(num_labels=10), small, forget_fraction=0.1,
                                output_dir=str(out), max_steps=1, per_device_train_batch_size=32,
                                use_cpu=True, disable_tqdm=True)
    assert "| munba.bargaining_power_forget | 0.2 |" in (out / "README.md").read_text()
    saved = MunbaArguments.from_json_string((out / "munba_args.json").read_text())
    assert saved.bargaining_power_forget == SAMPLE_FORGET_POWER


def test_ranks_that_chose_different_powers_are_one_clear_error(monkeypatch):
    """Under DDP every rank must bargain under the same power; given different datasets they
    would not, so the trainer's check (run when the power was chosen and there are several
    ranks; the two-process run in test_trainer_ddp.py goes through it) refuses."""
    import accelerate.utils

    from hf_munba.classification.forget_power import check_same_on_every_rank

    monkeypatch.setattr(accelerate.utils, "gather_object", lambda objs: [1.0, 0.2])
    with pytest.raises(ValueError, match="ranks chose different forget powers"):
        check_same_on_every_rank(1.0)
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda objs: [0.2, 0.2])
    check_same_on_every_rank(0.2)
