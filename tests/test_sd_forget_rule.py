"""train_munba_sd.py with bargaining powers and the satisfied forget player (real script, tiny model).

The rule engages (the forget player leaves at a logged step), changes nothing before that,
survives --resume_from_checkpoint bitwise, and --method munba-paper is today's plain MUNBa.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from test_sd_train import TRAIN, _run, _unet_state, assets, common  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
# relative target 10x the mean of the first two losses, no smoothing: the reference is known at
# step 2 and the player is satisfied from then on, deterministically
ENGAGE = ["--forget_target", 10.0, "--forget_target_reference_steps", 2, "--forget_target_ema", 0,
          "--satisfied_power_forget", 0]  # the player leaves (the default power is 0.1)


def _history(out):
    return [json.loads(l) for l in (Path(out) / "history.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def paper_run(assets):
    out = assets["root"] / "munba_paper"
    _run(TRAIN, common(assets, out, steps=4) + ["--method", "munba-paper"])
    return out


def test_rule_engages_and_is_logged_and_changes_nothing_before(assets, paper_run, tmp_path):
    out = tmp_path / "engaged"
    _run(TRAIN, common(assets, out, steps=4) + ENGAGE)
    hist, paper = _history(out), _history(paper_run)
    assert [h["munba/power_forget"] for h in hist] == [1.0, 0.0, 0.0, 0.0]
    assert [h["munba/forget_satisfied"] for h in hist] == [0.0, 1.0, 1.0, 1.0]
    assert hist[0]["munba/weight_forget"] > 0 and all(h["munba/weight_forget"] == 0.0
                                                      for h in hist[1:])
    assert "munba/forget_target" in hist[1] and "munba/forget_loss_ema" in hist[0]
    # step 1 is the paper's step exactly; then the runs part
    assert {k: hist[0][k] for k in paper[0]} == paper[0]
    assert hist[1]["munba/weight_forget"] != paper[1]["munba/weight_forget"]
    metrics = json.loads((out / "training_metrics.json").read_text())
    assert metrics["forget_times_satisfied"] == 1 and metrics["forget_satisfied_at_end"] is True


def test_munba_paper_is_plain_munba(assets, paper_run, tmp_path):
    """munba-paper = equal powers every step = munba whose target is never reached."""
    out = tmp_path / "never"
    _run(TRAIN, common(assets, out, steps=4) + ["--forget_target", -1.0,
                                                "--forget_target_mode", "absolute"])
    a, b = _unet_state(paper_run), _unet_state(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    paper, never = _history(paper_run), _history(out)
    assert all(h["munba/power_forget"] == 1.0 and "munba/forget_satisfied" not in h for h in paper)
    for p, n in zip(paper, never):
        assert {k: n[k] for k in p} == p  # the same steps; the rule only adds its own columns


def test_resume_keeps_the_rule_state_bitwise(assets, tmp_path):
    full = tmp_path / "full"
    _run(TRAIN, common(assets, full, steps=4) + ENGAGE + ["--checkpointing_steps", 2])
    state = json.loads((full / "checkpoint-2" / "munba_state.json").read_text())
    assert state["forget_rule"]["satisfied"] is True and state["forget_rule"]["reference"] > 0
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    _run(TRAIN, common(assets, resumed, steps=4) + ENGAGE + [
        "--checkpointing_steps", 2, "--resume_from_checkpoint", "latest"])
    a, b = _unet_state(full), _unet_state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _history(full) == _history(resumed)


@pytest.mark.parametrize("extra, message", [
    (["--method", "munba-paper", "--forget_target", 0.1], "munba only"),
    (["--method", "weighted", "--bargaining_power_forget", 2.0], "munba only"),
    (["--forget_objective", "ga", "--forget_target", 0.5, "--forget_target_mode", "relative"],
     "negated"),
    (["--forget_target_hysteresis", 0.5], "hysteresis"),
    (["--forget_target_ema", 1.0], "ema"),
    (["--bargaining_power_forget", 0.0, "--forget_objective", "ga"], "must be positive"),
])
def test_bad_rule_options_fail_with_one_message(assets, tmp_path, extra, message):
    proc = _run(TRAIN, common(assets, tmp_path / "bad") + extra, expect_ok=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "bad").exists()
