"""The step-cost benchmark runs its CPU configurations and compares like with like."""

import importlib.util
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_step_cost", ROOT / "eval" / "bench_step_cost.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_reference_and_munba_steps_make_the_same_update():
    """Same weights, different cost: the benchmark times equal work."""
    bench = load_bench()
    after = {}
    for method in ("munba", "reference"):
        work = bench.build("classifier-digits", "cpu", "fp32")
        work.optimizer = torch.optim.SGD(work.params, lr=0.5)
        bench.STEPS[method](work, 0)
        after[method] = torch.cat([p.detach().reshape(-1) for p in work.params])
    before = torch.cat([p.detach().reshape(-1) for p in bench.build("classifier-digits", "cpu", "fp32").params])
    assert not torch.allclose(after["munba"], before)
    assert torch.allclose(after["munba"], after["reference"], atol=1e-5)


def test_benchmark_writes_table_and_json(tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "bench.json"
    rows = bench.main(["--configs", "sd-tiny", "classifier-digits", "--steps", "1",
                       "--warmup", "0", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "munba/weighted time" in printed and "sd-tiny" in printed
    data = json.loads(out.read_text())
    assert data["meta"]["torch"] == torch.__version__ and "date" in data["meta"]
    assert [r["config"] for r in data["rows"]] == ["sd-tiny", "classifier-digits"] == [r["config"] for r in rows]
    for r in data["rows"]:
        assert all(r["ms"][m] > 0 for m in ("weighted", "munba", "reference"))
        assert r["munba_vs_weighted_time"] > 0
