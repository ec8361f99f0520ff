"""Several forget concepts in the SD script: each its own bargaining player, or pooled.

End to end through training/train_munba_sd.py on the tiny pipeline (16x16, 2-4 steps): the
per-concept players and their satisfied-player rules reach history.jsonl, the checkpoint and the
model card; a resumed run ends bitwise where the uninterrupted one did; bad input is one error
line before any model work.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from hf_munba.bargaining import DEFAULT_SATISFIED_POWER
from test_sd_train import TRAIN, _run, _unet_state


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A saved tiny pipeline, two concepts' D_f (two prompts each) and a D_r."""
    from hf_munba.diffusion.generation import generate_images
    from hf_munba.testing import save_tiny_sd_pipeline, tiny_sd_pipeline

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sdmulti")
    pipe_dir = save_tiny_sd_pipeline(root / "pipe")
    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2, height=16, width=16, batch_size=8, progress=False)
    generate_images(pipe, ["nudity", "naked"], root / "nudity", **kw)
    generate_images(pipe, ["violence", "blood"], root / "violence", seed=10, **kw)
    generate_images(pipe, ["a person wearing clothes"], root / "retain", num_images_per_prompt=4,
                    seed=100, **kw)
    return {"root": root, "pipe": Path(pipe_dir), "retain": root / "retain",
            "concepts": [f"nudity={root / 'nudity'}", f"violence={root / 'violence'}"]}


def common(assets, out, steps=4):
    return ["--pretrained_model_name_or_path", assets["pipe"], "--forget_concepts",
            *assets["concepts"], "--retain_data_dir", assets["retain"], "--output_dir", out,
            "--resolution", 16, "--train_batch_size", 2, "--max_train_steps", steps,
            "--learning_rate", 1e-3, "--report_to", "none", "--seed", 0, "--cache_latents",
            # a target every concept reaches at once, so the rules' state is non-trivial
            "--forget_target", 10.0, "--forget_target_mode", "relative",
            "--checkpointing_steps", 2]


@pytest.fixture(scope="module")
def per_concept_run(assets):
    out = assets["root"] / "per_concept"
    _run(TRAIN, common(assets, out))
    return out


def _history(out):
    return [json.loads(line) for line in (Path(out) / "history.jsonl").read_text().splitlines()]


def test_per_concept_players_are_logged_checkpointed_and_carded(per_concept_run):
    out = per_concept_run
    h = _history(out)
    assert len(h) == 4
    for key in ("loss/retain", "loss/forget_nudity", "loss/forget_violence",
                "munba/weight_forget_nudity", "munba/grad_norm_forget_violence",
                "munba/power_forget_nudity", "munba/forget_violence_satisfied",
                "munba/cos_retain_forget_nudity", "munba/cos_forget_nudity_forget_violence"):
        assert key in h[-1], key
    assert "loss/forget" not in h[-1]
    # the target (10x the first loss) is met at once: both concepts satisfied, powers lowered
    assert h[-1]["munba/forget_nudity_satisfied"] == 1.0
    assert h[-1]["munba/power_forget_violence"] == pytest.approx(DEFAULT_SATISFIED_POWER)
    metrics = json.loads((out / "training_metrics.json").read_text())
    for k in ("before/forget_loss_nudity", "after/forget_loss_violence",
              "forget_nudity_times_satisfied", "forget_violence_satisfied_at_end"):
        assert k in metrics, k
    state = json.loads((out / "checkpoint-2" / "munba_state.json").read_text())
    assert sorted(state["forget_rules"]) == ["nudity", "violence"]
    card = (out / "README.md").read_text()
    assert "nudity: `naked`, `nudity`" in card and "violence: `blood`, `violence`" in card
    assert "each forget concept is its own player" in card


def test_per_concept_resume_restores_every_rule_and_data_position(assets, per_concept_run,
                                                                   tmp_path):
    out = per_concept_run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    _run(TRAIN, common(assets, resumed) + ["--resume_from_checkpoint", "latest"])
    a, b = _unet_state(out), _unet_state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _history(out) == _history(resumed)


def test_pooled_is_one_forget_player_with_per_concept_metrics(assets, tmp_path):
    out = tmp_path / "pooled"
    _run(TRAIN, common(assets, out, steps=2) + ["--forget_players", "pooled"])
    h = _history(out)
    assert "loss/forget" in h[-1] and "munba/forget_satisfied" in h[-1]
    assert not any(k.startswith("loss/forget_") for k in h[-1])
    metrics = json.loads((out / "training_metrics.json").read_text())
    assert {"before/forget_loss_nudity", "after/forget_loss_violence"} <= set(metrics)
    assert "every forget concept pooled" in (out / "README.md").read_text()


def test_manifest_with_prompts_and_anchors(assets, tmp_path):
    """A manifest gives each concept its prompts and remap target; relative folders resolve
    against the manifest's folder; the weighted sum takes per-concept players too."""
    root = assets["root"]
    manifest = root / "concepts.json"
    manifest.write_text(json.dumps({
        "nudity": {"data_dir": "nudity", "prompts": ["nudity"],
                   "anchor_prompt": "a person wearing clothes"},
        "violence": {"data_dir": str(root / "violence"), "anchor_prompt": "a calm street"}}))
    args = common(assets, tmp_path / "m", steps=2)
    i = args.index("--forget_concepts")
    args[i:i + 3] = ["--forget_manifest", manifest]
    k = args.index("--forget_target")
    del args[k:k + 4]
    _run(TRAIN, args + ["--method", "weighted", "--forget_weight", "0.5"])
    h = _history(tmp_path / "m")
    assert {"loss/forget_nudity", "loss/forget_violence"} <= set(h[-1])


@pytest.mark.parametrize("extra,message", [
    (["--forget_concepts", "a=X", "a=Y"], "repeated: ['a']"),
    (["--forget_concepts", "only=X"], "at least two"),
    (["--forget_concepts", "a=X", "b"], "is not NAME=FOLDER"),
    (["--forget_concepts", "a b=X", "c=Y"], "concept name must be"),
    (["--forget_players", "pooled"], "--forget_players needs several concepts"),
    (["--forget_concepts", "a=X", "b=Y", "--forget_data_dir", "X"],
     "--forget_data_dir names a single forget set"),
])
def test_bad_concepts_are_one_error_line(assets, tmp_path, extra, message):
    args = ["--pretrained_model_name_or_path", assets["pipe"], "--retain_data_dir",
            assets["retain"], "--output_dir", tmp_path / "o", "--report_to", "none", *extra]
    if "--forget_concepts" not in extra and "--forget_data_dir" not in extra:
        args += ["--forget_data_dir", assets["root"] / "nudity"]
    proc = _run(TRAIN, args, expect_ok=False)
    assert proc.returncode == 2
    assert message in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists()


def test_a_concept_with_no_data_is_refused_before_model_work(assets, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = common(assets, tmp_path / "o")
    i = args.index("--forget_concepts")
    args[i + 2] = f"violence={empty}"
    proc = _run(TRAIN, args, expect_ok=False)
    assert proc.returncode == 2
    assert "forget concept 'violence': directory" in proc.stderr and "is empty" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_concepts_sharing_an_image_are_refused(assets, tmp_path):
    args = common(assets, tmp_path / "o")
    i = args.index("--forget_concepts")
    args[i + 2] = f"copy={assets['root'] / 'nudity'}"
    proc = _run(TRAIN, args, expect_ok=False)
    assert proc.returncode == 2 and "forget concepts 'nudity' and 'copy' overlap" in proc.stderr


def test_generation_script_writes_each_concept_and_a_manifest(assets, tmp_path):
    from test_sd_train import GENERATE

    out = tmp_path / "data"
    proc = _run(GENERATE, ["--pretrained_model_name_or_path", assets["pipe"], "--output_dir", out,
                           "--forget_concepts", "fruit=apple", "fruit=pear", "cat=a cat",
                           "--retain_prompts", "a dog", "--num_images_per_prompt", 1,
                           "--num_inference_steps", 2, "--resolution", 16])
    manifest = json.loads((out / "concepts.json").read_text())
    assert manifest == {"fruit": {"data_dir": "forget_fruit", "prompts": ["apple", "pear"]},
                        "cat": {"data_dir": "forget_cat", "prompts": ["a cat"]}}
    assert len((out / "forget_fruit" / "metadata.jsonl").read_text().splitlines()) == 2
    assert len((out / "retain" / "metadata.jsonl").read_text().splitlines()) == 3  # |D_r| = |D_f|
    assert "--forget_manifest" in proc.stdout
    bad = _run(GENERATE, ["--pretrained_model_name_or_path", assets["pipe"], "--output_dir",
                          tmp_path / "x", "--forget_concepts", "solo=apple"], expect_ok=False)
    assert bad.returncode != 0 and "at least two concepts" in bad.stderr


def test_digits_multiconcept_protocol_pieces(tmp_path):
    """The experiment's remaps skip forgotten digits, and its argument lists parse as the
    script's config (per concept / pooled with the manifest, one digit of the sequential chain)."""
    import sys

    from hf_munba.testing.digits_unlearning import (concept_remaps, concept_train_script_args,
                                                    write_concept_manifest)

    assert concept_remaps([3, 7]) == {3: 4, 7: 8}
    assert concept_remaps([3, 4, 9]) == {3: 5, 4: 5, 9: 0}
    with pytest.raises(ValueError):
        concept_remaps([3, 3])
    data = {"forget": {3: str(tmp_path / "f3"), 7: str(tmp_path / "f7")}, "retain": "r"}
    manifest = write_concept_manifest(tmp_path / "c.json", data, [3, 7])
    entries = json.loads(Path(manifest).read_text())
    assert entries["three"]["anchor_prompt"] == "a handwritten digit four"
    sys.path.insert(0, str(TRAIN.parent))
    from train_munba_sd import parse_args

    for kw in ({"manifest": manifest, "forget_players": "pooled"},
               {"single": (data["forget"][7], 7, 8), "use_lora": True, "fuse_lora": True}):
        cfg = parse_args(concept_train_script_args(method="munba", pretrained="p", retain_dir="r",
                                                   output_dir=str(tmp_path / "o"), **kw))
        assert cfg.forget_players_mode == ("pooled" if "manifest" in kw else None)
