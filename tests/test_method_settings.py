"""Method settings live with the methods; ``MunbaArguments`` is assembled from and checked by them."""

import dataclasses
import json
from dataclasses import make_dataclass

import pytest

from hf_munba.classification.trainer import MunbaArguments, MunbaTrainerArguments
from hf_munba.unlearning.methods import (METHODS, MethodSetting, UnlearningMethod, get_method,
                                         method_settings, register_method, settings_fields,
                                         validate_settings)

# Every field name that MunbaArguments had before the settings moved to the methods (flags,
# checkpoints' munba_args and the bench's configuration keys depend on them).
LEGACY_FIELDS = {
    "method": "munba", "forget_loss": None, "forget_weight": 1.0, "forget_batch_size": None,
    "l1_alpha": 5e-4, "salun_ratio": 0.5, "opposed_tol": 1e-4, "fallback_player": 0,
    "max_consecutive_skips": 10, "bargaining_power_forget": 1.0, "forget_target": None,
    "forget_target_mode": None, "forget_target_ema": 0.9, "forget_target_hysteresis": 1.5,
    "forget_target_reference_steps": 1, "satisfied_power_forget": 0.1,
}


# The settings of the paper's other baselines (hf_munba/classification/baselines.py).
BASELINE_FIELDS = {"iu_alpha": 10.0, "iu_damping": 1.0, "iu_fisher_batches": 64, "bs_epsilon": 0.1,
                   "shs_ratio": 0.03, "shs_lambda": 0.05}


# Fields added since (with their defaults).
NEW_FIELDS = {"retain_objective": "ce"}

# Defaults changed on purpose since (the name stays; an old value still loads).
CHANGED_DEFAULTS = {"bargaining_power_forget": None}  # was 1.0: MunbaTrainer picks it per forget set


def test_every_legacy_field_keeps_its_name_and_default():
    assert MunbaArguments().to_dict() == {**LEGACY_FIELDS, **BASELINE_FIELDS, **NEW_FIELDS,
                                          **CHANGED_DEFAULTS}
    assert MunbaArguments.from_dict({**MunbaArguments().to_dict(), **LEGACY_FIELDS}) \
        .bargaining_power_forget == 1.0  # a checkpoint's munba_args from before still loads


def test_method_fields_come_from_the_methods_that_declare_them():
    by_name = {f.name: f for f in dataclasses.fields(MunbaArguments)}
    own = {f.name for f in dataclasses.fields(MunbaTrainerArguments)}
    declared = method_settings("classification")
    assert set(by_name) == own | set(declared)
    assert set(declared) >= {"l1_alpha", "salun_ratio", "forget_weight", "opposed_tol"}
    assert declared["l1_alpha"][1] == ["l1"] and declared["salun_ratio"][1] == ["salun"]
    assert declared["forget_weight"][1] == ["weighted"]
    assert set(declared["opposed_tol"][1]) == {"munba", "munba-paper"}
    assert "munba-paper" not in declared["forget_target"][1]  # no satisfied-player rule there
    for name, (setting, users) in declared.items():
        assert by_name[name].default == setting.default
        assert all(u in by_name[name].metadata["help"] for u in users)


def test_the_sd_config_takes_its_method_defaults_from_the_same_declarations():
    """Both front ends read one default per setting: the SD flags' defaults are the methods'."""
    from hf_munba.diffusion.config import SDUnlearningConfig

    sd = {f.name: f.default for f in dataclasses.fields(SDUnlearningConfig)}
    declared = method_settings("diffusion")
    shared = set(declared) & set(sd)
    assert shared >= {"forget_weight", "opposed_tol", "bargaining_power_forget", "forget_target",
                      "forget_target_mode", "forget_target_ema", "forget_target_hysteresis",
                      "forget_target_reference_steps", "satisfied_power_forget"}
    for name in shared:
        assert sd[name] == declared[name][0].default, name


def test_a_bad_setting_fails_in_post_init_with_the_field_name():
    for bad, word in [(dict(salun_ratio=0.0), "salun_ratio"), (dict(salun_ratio=1.5), "salun_ratio"),
                      (dict(l1_alpha=-1.0), "l1_alpha"), (dict(forget_weight=0), "forget_weight"),
                      (dict(opposed_tol=1.0), "opposed_tol"), (dict(fallback_player=2), "fallback_player"),
                      (dict(forget_target_mode="both"), "forget_target_mode"),
                      (dict(forget_target_ema=1.0), "forget_target_ema"),
                      (dict(satisfied_power_forget=-0.1), "satisfied_power_forget"),
                      (dict(forget_batch_size=0), "forget_batch_size")]:
        with pytest.raises(ValueError, match=word):
            MunbaArguments(**bad)


def test_json_round_trip_and_unknown_keys():
    args = MunbaArguments(method="salun", salun_ratio=0.25, l1_alpha=0.0, fallback_player=None,
                          forget_target=0.3, forget_target_mode="absolute")
    again = MunbaArguments.from_json_string(args.to_json_string())
    assert again == args and isinstance(again, MunbaArguments)
    assert MunbaArguments.from_dict(json.loads(args.to_json_string())).to_dict() == args.to_dict()
    with pytest.raises(ValueError, match="unknown MunbaArguments fields"):
        MunbaArguments.from_dict({**args.to_dict(), "salun_ration": 0.1})


def test_every_setting_has_a_cli_flag():
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser((MunbaArguments,)).parse_args_into_dataclasses(
        ["--method", "salun", "--salun_ratio", "0.2", "--l1_alpha", "0.01", "--forget_weight", "3",
         "--fallback_player", "1", "--forget_target", "0.5", "--forget_target_mode", "absolute",
         "--opposed_tol", "0.001"])
    assert (args.salun_ratio, args.l1_alpha, args.forget_weight, args.fallback_player) == (0.2, 0.01, 3.0, 1)
    assert (args.forget_target, args.forget_target_mode, args.opposed_tol) == (0.5, "absolute", 0.001)
    with pytest.raises(ValueError, match="salun_ratio"):
        HfArgumentParser((MunbaArguments,)).parse_args_into_dataclasses(["--salun_ratio", "0"])


def test_a_method_reads_its_setting_from_the_config_or_its_default():
    salun = get_method("salun")
    assert salun(None).setting("salun_ratio") == 0.5
    assert salun(MunbaArguments(salun_ratio=0.2)).setting("salun_ratio") == 0.2

    class SDArgs:  # the SD script's argparse namespace: only the options it has
        opposed_tol = 0.01

    assert get_method("munba")(SDArgs()).setting("opposed_tol") == 0.01
    assert get_method("munba")(SDArgs()).setting("fallback_player") == 0
    with pytest.raises(KeyError, match="declares no setting"):
        salun(None).setting("l1_alpha")  # a method reads only what it declares


def test_a_new_method_with_a_setting_is_one_class():
    """Registering a method is all it takes for its setting to become a validated config field."""
    try:
        @register_method("test-scaled-ft")
        class ScaledFineTune(UnlearningMethod):
            front_ends = ("classification",)
            settings = {"test_scale": MethodSetting(2.0, "loss scale", float, lambda v: v > 0, "positive")}

            def retain_loss(self, loss, model):
                return self.setting("test_scale") * loss

        cls = make_dataclass("Args", settings_fields("classification"), bases=(MunbaTrainerArguments,))
        assert cls(method="test-scaled-ft").test_scale == 2.0
        with pytest.raises(ValueError, match="test_scale must be positive"):
            cls(test_scale=-1.0)
        assert ScaledFineTune(cls(test_scale=3.0)).retain_loss(1.0, None) == 3.0

        @register_method("test-clash")
        class Clash(UnlearningMethod):
            front_ends = ("classification",)
            settings = {"test_scale": MethodSetting(5.0, "another default", float)}

        with pytest.raises(TypeError, match="different settings named 'test_scale'"):
            method_settings("classification")
    finally:
        METHODS.pop("test-scaled-ft", None)
        METHODS.pop("test-clash", None)
    validate_settings(MunbaArguments(), "classification")  # the registry is clean again
