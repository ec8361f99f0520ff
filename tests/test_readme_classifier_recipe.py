"""The README's classifier recipe runs as written: train the original, unlearn from it, retrain
from scratch as the gold standard, evaluate.

The commands are read from the fenced block that follows the ``classifier-recipe`` marker in
README.md, so the README cannot drift from what works. They run in a fresh folder, in this
process (one start-up instead of four), scaled down only by flags appended to the training
commands (``--max_steps``, which overrides ``--num_train_epochs``).
"""

import importlib.util
import json
import shlex
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- classifier-recipe"
SCALE_DOWN = ["--max_steps", "2", "--use_cpu", "--disable_tqdm", "true"]


def readme_recipe():
    """The recipe's commands as argv lists (comments dropped, line continuations joined)."""
    text = (ROOT / "README.md").read_text()
    assert text.count(MARKER) == 1, "README.md needs exactly one classifier-recipe marker"
    block = text.split(MARKER, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            commands.append(shlex.split(line))
    return commands


def _main(script: Path):
    name = script.stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, script)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name].main


def test_readme_recipe_commands_are_complete():
    """Four commands, each `python <script that exists> ...`; every model the evaluation reads
    is written by an earlier command, and the unlearned and retrained models start from the
    original, not from a random model."""
    commands = readme_recipe()
    assert [c[1] for c in commands] == ["training/train_munba_classifier.py"] * 3 + ["eval/evaluate_classifiers.py"]
    assert all(c[0] == "python" and (ROOT / c[1]).is_file() for c in commands)
    outputs = [c[c.index("--output_dir") + 1] for c in commands[:3]]
    original = outputs[0]
    for c in commands[1:3]:
        assert c[c.index("--model_name_or_path") + 1] == original
    ev = commands[3]
    models = [m.partition("=")[2] for m in ev[ev.index("--models") + 1:] if "=" in m and not m.startswith("--")]
    assert set(models + [ev[ev.index("--retrain") + 1]]) <= set(outputs)
    methods = [c[c.index("--method") + 1] for c in commands[:3]]
    assert methods == ["ft", "munba", "retrain"]
    assert "--forget_classes" not in commands[0]  # the original forgets nothing


def test_readme_recipe_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for argv in readme_recipe():
        script = ROOT / argv[1]
        extra = SCALE_DOWN if script.name == "train_munba_classifier.py" else []
        _main(script)(argv[2:] + extra)
    out = tmp_path / "out"
    original = json.loads((out / "original" / "unlearning_metrics.json").read_text())
    assert original["forget"] == {} and original["method"] == "ft"
    assert {"acc_retain", "acc_test"} <= set(original["metrics"]) and "acc_forget" not in original["metrics"]
    munba = json.loads((out / "munba" / "unlearning_metrics.json").read_text())
    assert munba["forget"]["classes"] == [3] and munba["method"] == "munba"
    retrain = json.loads((out / "retrain" / "unlearning_metrics.json").read_text())
    assert retrain["method"] == "retrain"
    results = json.loads((out / "eval" / "results.json").read_text())
    assert set(results) >= {"original", "munba", "retrain"}
    assert results["retrain"]["avg_gap"] == 0.0
    for name in ("original", "munba"):
        assert 0.0 <= results[name]["avg_gap"] <= 100.0
        assert 0.0 <= results[name]["mia_efficacy"] <= 100.0
    # the unlearned model's card names its base by folder only: no local path, no Hub base_model
    card = (out / "munba" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert "base_model" not in meta and "`original`" in card and str(tmp_path) not in card
