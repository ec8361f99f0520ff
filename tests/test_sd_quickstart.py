"""The README's main job, training/quickstart.py, runs offline end to end and shows the effect."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_offline_and_forget_prompts_move_to_the_anchor(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    out = tmp_path / "qs"
    proc = subprocess.run([sys.executable, str(ROOT / "training" / "quickstart.py"),
                           "--output_dir", str(out)], capture_output=True, text=True, env=env,
                          cwd=str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = re.findall(r"^(.+?)\s+(forget|retain)\s+([\d.]+)\s+([\d.]+)\s+(-?\d+)%$", proc.stdout, re.M)
    assert len(rows) == 8, proc.stdout
    change = {name.strip(): int(pct) for name, _, _, _, pct in rows}
    forget = [change[p] for p in ("nudity", "naked", "erotic", "sexual")]
    retain = [v for k, v in change.items() if k not in ("nudity", "naked", "erotic", "sexual")]
    assert max(forget) < min(retain)  # the forget prompts moved towards the anchor the most
    assert (out / "model" / "model_index.json").exists() and (out / "model" / "README.md").exists()
    # a second run replaces its own folder, but never a folder it did not make
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep").write_text("x")
    proc = subprocess.run([sys.executable, str(ROOT / "training" / "quickstart.py"),
                           "--output_dir", str(other)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode != 0 and "not made by the quickstart" in proc.stderr
    assert (other / "keep").exists()
