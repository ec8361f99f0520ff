"""The step-cost benchmark runs its CPU configurations and compares like with like."""

import gc
import importlib.util
import json
import sys
import weakref
from pathlib import Path

import pytest
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


def test_benchmark_options_reach_the_workload(tmp_path, capsys):
    bench = load_bench()
    work = bench.build("sd-tiny", "cpu", "fp32", batch_size=2, gradient_checkpointing=True)
    assert work.batch_size == 2 and work.model.is_gradient_checkpointing
    rows = bench.main(["--configs", "sd-tiny", "--batch_size", "2", "--gradient_checkpointing",
                       "--steps", "1", "--warmup", "0"])
    assert rows[0]["batch_size"] == 2 and "sd-tiny (batch 2)" in capsys.readouterr().out
    rows = bench.main(["--configs", "classifier-digits", "--methods", "munba", "weighted",
                       "--steps", "1", "--warmup", "0"])
    assert set(rows[0]["ms"]) == {"weighted", "munba"} and rows[0]["reference_vs_munba_time"] is None
    assert rows[0]["munba_vs_weighted_time"] > 0 and "| n/a |" in capsys.readouterr().out
    for bad, message in ((["--batch_size", "0"], "batch_size"),
                         (["--configs", "classifier-digits", "--gradient_checkpointing"],
                          "SD configurations only")):
        with pytest.raises(SystemExit):
            bench.main(bad)
        assert message in capsys.readouterr().err


def test_each_configuration_is_freed_before_the_next_is_built_or_measured(monkeypatch):
    """Leftover tensors would add to the next peak-memory reading and bias every ratio toward 1."""
    bench = load_bench()
    built = []

    def assert_all_freed():
        assert all(ref() is None for ref in built), "a previous workload is still alive"

    def build(*a, **k):
        assert_all_freed()
        work = real_build(*a, **k)
        built.append(weakref.ref(work.model))
        return work

    def peak_rss(*a, **k):
        assert_all_freed()
        return 1

    real_build = bench.build
    monkeypatch.setattr(bench, "build", build)
    monkeypatch.setattr(bench, "cpu_peak_rss", peak_rss)
    gc.disable()  # only the benchmark's own clean-up may free them
    try:
        bench.main(["--configs", "sd-tiny", "classifier-digits", "--steps", "1", "--warmup", "0",
                    "--memory"])
    finally:
        gc.enable()
    assert len(built) == 2


def test_cpu_peak_memory_separates_the_methods():
    """The step's own peak, not the model build's: the reference (every graph kept for three
    backward passes, flat gradient copies) must need more than MUNBa (one graph at a time)."""
    bench = load_bench()
    peak = {m: bench.cpu_peak_rss("sd-small", "fp32", m, 1, None, False) for m in ("munba", "reference")}
    assert peak["reference"] > 1.03 * peak["munba"], peak


def test_every_model_family_has_a_tiny_configuration(capsys):
    bench = load_bench()
    rows = bench.main(["--configs", "sdxl-tiny", "sd3-tiny", "flux-tiny", "--steps", "1",
                       "--warmup", "0", "--batch_size", "2"])
    assert [r["config"] for r in rows] == ["sdxl-tiny", "sd3-tiny", "flux-tiny"]
    for r in rows:
        assert all(r["ms"][m] > 0 for m in ("sum", "weighted", "munba", "reference"))
