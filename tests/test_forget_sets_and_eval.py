"""Forget-set splitting and the classification metrics (MIA-efficacy, Avg. Gap, tables)."""

import json

import numpy as np
import pytest

from hf_munba.classification.data import digits_dataset
from hf_munba.evaluation.classification import (aggregate_runs, avg_gap, mia_efficacy,
                                                results_markdown, write_results)
from hf_munba.classification.forget_sets import ForgetSpec, parse_forget_classes, split_forget_retain


@pytest.fixture(scope="module")
def digits():
    return digits_dataset()


def _labels(ds):
    return [int(v) for v in ds["labels"]]


def test_split_by_class_fraction_and_indices(digits):
    train = digits["train"]
    f, r = split_forget_retain(train, ForgetSpec(classes=[3, 5]))
    assert set(_labels(f)) == {3, 5} and not {3, 5} & set(_labels(r))
    assert len(f) + len(r) == len(train)
    f1, _ = split_forget_retain(train, ForgetSpec(fraction=0.1, seed=1))
    f2, _ = split_forget_retain(train, ForgetSpec(fraction=0.1, seed=1))
    assert len(f1) == round(0.1 * len(train)) and _labels(f1) == _labels(f2)
    f, r = split_forget_retain(train, ForgetSpec(indices=[0, 7, 9]))
    assert len(f) == 3 and len(r) == len(train) - 3
    assert int(f[1]["labels"]) == int(train[7]["labels"])


@pytest.mark.parametrize("kwargs, msg", [
    (dict(), "exactly one"), (dict(classes=[1], fraction=0.1), "exactly one"),
    (dict(fraction=1.5), r"\(0, 1\)"), (dict(indices=[1, 1]), "duplicates"), (dict(classes=[]), "empty"),
])
def test_bad_specs(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        ForgetSpec(**kwargs)


def test_bad_split_inputs(digits):
    with pytest.raises(ValueError, match="not labels of this dataset"):
        split_forget_retain(digits["train"], ForgetSpec(classes=[42]))
    with pytest.raises(ValueError, match="out of range"):
        split_forget_retain(digits["train"], ForgetSpec(indices=[10 ** 6]))
    with pytest.raises(ValueError, match="unknown forget class"):
        parse_forget_classes("cat", {"dog": 0})
    assert parse_forget_classes("dog,2", {"dog": 0}) == [0, 2]


def test_mia_efficacy_on_planted_confidences():
    rng = np.random.default_rng(0)
    members = rng.uniform(0.95, 1.0, 300)  # retain: confident
    non_members = rng.uniform(0.0, 0.6, 300)  # test: not confident
    assert mia_efficacy(members, non_members, rng.uniform(0.0, 0.6, 100)) >= 95.0
    assert mia_efficacy(members, non_members, rng.uniform(0.96, 1.0, 100)) <= 5.0
    half = np.concatenate([rng.uniform(0.0, 0.6, 50), rng.uniform(0.96, 1.0, 50)])
    assert 40.0 <= mia_efficacy(members, non_members, half) <= 60.0


def test_avg_gap_and_tables(tmp_path):
    ref = {"acc_forget": 0.0, "acc_retain": 100.0, "acc_test": 90.0, "mia_efficacy": 100.0}
    m = {"acc_forget": 4.0, "acc_retain": 98.0, "acc_test": 91.0, "mia_efficacy": 99.0}
    assert avg_gap(m, ref) == pytest.approx((4 + 2 + 1 + 1) / 4)
    assert avg_gap(ref, ref) == 0.0
    with pytest.raises(ValueError, match="acc_forget"):
        avg_gap({"acc_retain": 1.0}, ref)
    agg = aggregate_runs([m, {**m, "acc_forget": 6.0}])
    assert agg["acc_forget"]["mean"] == 5.0 and agg["acc_forget"]["std"] == pytest.approx(np.sqrt(2))
    md = results_markdown({"munba": agg})
    assert "| munba | 5.00 ± 1.41 |" in md
    paths = write_results({"retrain": ref, "munba": agg}, str(tmp_path), title="t")
    assert json.load(open(paths["json"]))["retrain"]["acc_test"] == 90.0
    assert open(paths["png"], "rb").read(4) == b"\x89PNG"
