"""NashBargainer semantics: in-place combination, accumulation, loss scaling, skips, DDP, shards."""

import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from hf_munba import BargainingStatus, NashBargainer, nash_bargaining_weights


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def make_batch(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def retain_loss(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y)


def forget_loss(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), (y + 1) % 3)


def reference_grads(model, xr, yr, xf, yf):
    params = list(model.parameters())
    gr = torch.autograd.grad(retain_loss(model, xr, yr), params)
    gf = torch.autograd.grad(forget_loss(model, xf, yf), params)
    return gr, gf


def bargained_grads(model, micro_batches, bargainer=None):
    bargainer = bargainer or NashBargainer(model.parameters())
    for xr, yr, xf, yf in micro_batches:
        with bargainer.player(0):
            (retain_loss(model, xr, yr) / len(micro_batches)).backward()
        with bargainer.player(1):
            (forget_loss(model, xf, yf) / len(micro_batches)).backward()
    stats = bargainer.combine()
    return [p.grad.clone() for p in model.parameters()], stats


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def test_combined_gradient_is_the_nash_direction_in_place():
    model = make_model()
    xr, yr = make_batch(8, 1)
    xf, yf = make_batch(8, 2)
    gr, gf = map(flat, reference_grads(model, xr, yr, xf, yf))
    gram = torch.stack([gr, gf]) @ torch.stack([gr, gf]).T
    a = nash_bargaining_weights(gram.double())
    grads, stats = bargained_grads(model, [(xr, yr, xf, yf)])
    d = flat(grads)
    assert stats.status is BargainingStatus.OK and not stats.skipped
    assert torch.allclose(d.double(), a[0] * gr.double() + a[1] * gf.double(), atol=1e-6)
    assert math.isclose(d.norm().item(), math.sqrt(2), rel_tol=1e-5)
    assert (gr @ d) > 0 and (gf @ d) > 0
    assert math.isclose(stats.cos, torch.nn.functional.cosine_similarity(gr, gf, 0).item(),
                        rel_tol=1e-5, abs_tol=1e-6)
    assert stats.norms == pytest.approx([gr.norm().item(), gf.norm().item()], rel=1e-5)
    log = stats.to_log_dict()
    assert set(log) >= {"munba/cos", "munba/weight_retain", "munba/weight_forget",
                        "munba/grad_norm_retain", "munba/grad_norm_forget", "munba/skipped"}


def test_gradient_accumulation_bargains_once_on_accumulated_gradients():
    """GA=2 with micro-batch b gives the same combined gradient as GA=1 with batch 2b."""
    xr, yr = make_batch(8, 1)
    xf, yf = make_batch(8, 2)
    full, _ = bargained_grads(make_model(), [(xr, yr, xf, yf)])
    halves = [(xr[:4], yr[:4], xf[:4], yf[:4]), (xr[4:], yr[4:], xf[4:], yf[4:])]
    accumulated, _ = bargained_grads(make_model(), halves)
    for a, b in zip(full, accumulated):
        assert torch.allclose(a, b, atol=1e-6)
    # bargaining each micro-batch separately and summing would be a different update
    per_micro = [bargained_grads(make_model(), [mb])[0] for mb in halves]
    summed = [0.5 * (a + b) for a, b in zip(*per_micro)]
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(full, summed))


def test_fp16_loss_scaling_gives_the_fp32_update():
    xr, yr = make_batch(8, 1)
    xf, yf = make_batch(8, 2)

    def run(use_scaler):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if use_scaler else None
        scale = (lambda loss: scaler.scale(loss)) if scaler else (lambda loss: loss)
        bargainer = NashBargainer(model.parameters())
        with bargainer.player(0):
            scale(retain_loss(model, xr, yr)).backward()
        with bargainer.player(1):
            scale(forget_loss(model, xf, yf)).backward()
        stats = bargainer.combine(grad_scale=scaler.get_scale() if scaler else None)
        if scaler:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        return flat(p.detach() for p in model.parameters()), stats

    w32, s32 = run(False)
    w16, s16 = run(True)
    assert s32.weights == pytest.approx([w * 2.0**12 for w in s16.weights], rel=1e-5)
    assert torch.allclose(w32, w16, atol=1e-6)
    assert not torch.allclose(w32, flat(p.detach() for p in make_model().parameters()))


def test_nonfinite_gradient_skips_and_a_grad_scaler_backs_off():
    model = make_model()
    before = flat(p.detach().clone() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    xr, yr = make_batch(8, 1)
    xf, yf = make_batch(8, 2)
    bargainer = NashBargainer(model.parameters())
    with bargainer.player(0):
        scaler.scale(retain_loss(model, xr, yr)).backward()
    with bargainer.player(1):
        scaler.scale(forget_loss(model, xf, yf) * float("nan")).backward()
    stats = bargainer.combine(grad_scale=scaler.get_scale())
    assert stats.skipped and stats.status is BargainingStatus.NONFINITE
    assert bargainer.num_skipped == 1
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0**12  # the scaler saw the NaN and backed off
    assert torch.equal(before, flat(p.detach() for p in model.parameters()))


def test_zero_forget_gradient_follows_retain_unit_gradient():
    model = make_model()
    xr, yr = make_batch(8, 1)
    gr = flat(torch.autograd.grad(retain_loss(model, xr, yr), list(model.parameters())))
    bargainer = NashBargainer(model.parameters())
    with bargainer.player(0):
        retain_loss(model, xr, yr).backward()
    with bargainer.player(1):
        (0.0 * sum(p.sum() for p in model.parameters())).backward()
    stats = bargainer.combine()
    assert stats.status is BargainingStatus.NO_PROPOSAL and not stats.skipped
    d = flat(p.grad for p in model.parameters())
    assert torch.allclose(d, gr / gr.norm(), atol=1e-6)


def test_parameters_touched_by_one_player_only():
    """A parameter only the retain loss reaches gets a_r * g_r; none of the math breaks."""
    torch.manual_seed(0)
    shared, only_r = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    x = torch.randn(5, 4)
    bargainer = NashBargainer([*shared.parameters(), *only_r.parameters()])
    with bargainer.player(0):
        only_r(shared(x)).square().mean().backward()
    with bargainer.player(1):
        shared(x).sum().backward()
    stats = bargainer.combine()
    assert stats.status is BargainingStatus.OK
    assert all(p.grad is not None for p in [*shared.parameters(), *only_r.parameters()])


def test_misuse_is_refused_clearly():
    model = make_model()
    x, y = make_batch(4, 0)
    retain_loss(model, x, y).backward()  # a stray .grad from outside the bargainer
    bargainer = NashBargainer(model.parameters())
    with pytest.raises(RuntimeError, match="zero_grad"):
        with bargainer.player(0):
            pass
    model.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="nested"):
        with bargainer.player(0):
            with bargainer.player(1):
                pass
    with pytest.raises(ValueError, match="player index"):
        with bargainer.player(2):
            pass
    with pytest.raises(ValueError, match="no parameters"):
        NashBargainer([torch.nn.Parameter(torch.ones(1), requires_grad=False)])


# ---------------------------------------------------------------- multi-process (gloo, CPU)

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model = torch.nn.parallel.DistributedDataParallel(make_model())
        xr, yr = make_batch(8, 1)
        xf, yf = make_batch(8, 2)
        shard = slice(rank * 4, rank * 4 + 4)
        bargainer = NashBargainer(model.parameters())
        for micro in (slice(0, 2), slice(2, 4)):  # gradient accumulation: sync on the last
            idx = torch.arange(8)[shard][micro]
            last = micro.start == 2
            ctx = model.no_sync() if not last else _nullcontext()
            with ctx:
                with bargainer.player(0):
                    (retain_loss(model, xr[idx], yr[idx]) / 2).backward()
                with bargainer.player(1):
                    (forget_loss(model, xf[idx], yf[idx]) / 2).backward()
        stats = bargainer.combine()
        torch.save({"weights": torch.tensor(stats.weights),
                    "grad": flat(p.grad for p in model.parameters())},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_ddp_ranks_agree_with_single_process_on_the_global_batch(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert torch.equal(r0["weights"], r1["weights"])
    assert torch.equal(r0["grad"], r1["grad"])
    xr, yr = make_batch(8, 1)
    xf, yf = make_batch(8, 2)
    single, stats = bargained_grads(make_model(), [(xr, yr, xf, yf)])
    assert torch.allclose(r0["weights"], torch.tensor(stats.weights), rtol=1e-5)
    assert torch.allclose(r0["grad"], flat(single), atol=1e-6)


def _sharded_worker(rank, world, port, out_dir):
    """Each rank owns half of every gradient, as FSDP would; the Gram needs one all-reduce."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        gen = torch.Generator().manual_seed(7)
        full_r, full_f = torch.randn(10, generator=gen), torch.randn(10, generator=gen)
        shard = slice(rank * 5, rank * 5 + 5)
        p = torch.nn.Parameter(torch.zeros(5))
        bargainer = NashBargainer([p], all_reduce_gram=True)
        with bargainer.player(0):
            (p * full_r[shard]).sum().backward()
        with bargainer.player(1):
            (p * full_f[shard]).sum().backward()
        stats = bargainer.combine()
        torch.save({"weights": torch.tensor(stats.weights), "grad": p.grad.clone()},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_sharded_gradients_all_reduce_the_gram(tmp_path):
    mp.spawn(_sharded_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    gen = torch.Generator().manual_seed(7)
    g = torch.stack([torch.randn(10, generator=gen), torch.randn(10, generator=gen)])
    a = nash_bargaining_weights((g @ g.T).double()).float()
    assert torch.allclose(r0["weights"], a, rtol=1e-5)
    assert torch.equal(r0["weights"], r1["weights"])
    assert torch.allclose(torch.cat([r0["grad"], r1["grad"]]), a @ g, atol=1e-6)


# ---------------------------------------------------------------- bargaining powers, satisfied player

from hf_munba import SatisfactionRule  # noqa: E402


def _two_player_bargainer(model, xr, yr, xf, yf, **kwargs):
    bargainer = NashBargainer(model.parameters(), **kwargs)
    with bargainer.player(0):
        retain_loss(model, xr, yr).backward()
    with bargainer.player(1):
        forget_loss(model, xf, yf).backward()
    return bargainer


def test_combine_with_powers_is_the_asymmetric_direction_and_unit_powers_are_bitwise_today():
    xr, yr = make_batch(8, 1)
    xf, yf = make_batch(8, 2)
    model = make_model()
    gr, gf = map(flat, reference_grads(model, xr, yr, xf, yf))
    g = torch.stack([gr, gf]).double()
    results = {}
    for name, kw, powers in [("plain", {}, None), ("ones", {}, [1.0, 1.0]),
                             ("ctor", {"powers": [1.0, 0.2]}, None), ("asym", {}, [1.0, 0.2]),
                             ("out", {}, [1.0, 0.0])]:
        model = make_model()
        stats = _two_player_bargainer(model, xr, yr, xf, yf, **kw).combine(powers=powers)
        results[name] = (flat(p.grad for p in model.parameters()), stats)
    assert torch.equal(results["plain"][0], results["ones"][0])
    assert results["plain"][1].weights == results["ones"][1].weights
    assert torch.equal(results["ctor"][0], results["asym"][0])
    a = nash_bargaining_weights(g @ g.T, powers=[1.0, 0.2])
    d, stats = results["asym"]
    assert torch.allclose(d.double(), a @ g, atol=1e-6)
    assert stats.status is BargainingStatus.OK
    assert stats.to_log_dict()["munba/power_forget"] == 0.2
    assert results["plain"][1].to_log_dict()["munba/power_forget"] == 1.0
    d_out, stats_out = results["out"]
    assert stats_out.status is BargainingStatus.OK and stats_out.weights[1] == 0.0
    assert torch.allclose(d_out, gr / gr.norm(), atol=1e-6)  # retain's unit gradient alone
    with pytest.raises(ValueError, match=">= 0"):
        _two_player_bargainer(make_model(), xr, yr, xf, yf).combine(powers=[1.0, -1.0])


def test_gram_creates_no_float64_tensor_on_the_device(monkeypatch):
    """Apple MPS has no float64: the device part of the Gram must stay in float32.

    Meta tensors stand in for an accelerator: every op on them is recorded, and any float64
    result there fails the test. (The solve then runs on the host in float64.)"""
    from torch.utils._python_dispatch import TorchDispatchMode

    class NoDeviceFloat64(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor) and t.device.type != "cpu":
                    assert t.dtype != torch.float64, f"{func} made a float64 tensor on {t.device}"
            return out

    params = [torch.nn.Parameter(torch.empty(5, 3, device="meta")),
              torch.nn.Parameter(torch.empty(7, device="meta"))]
    bargainer = NashBargainer(params)
    for i in range(2):
        bargainer._grads[i] = [torch.empty(5, 3, device="meta"), torch.empty(7, device="meta")]
    with NoDeviceFloat64():
        terms, segments = bargainer._device_gram_terms()
    assert terms.device.type == "meta" and terms.dtype == torch.float32
    assert segments == [(0, 0, 2), (0, 1, 2), (1, 1, 2)]
    # the same on real (CPU) tensors gives the float64 Gram of the flattened gradients
    model = make_model()
    xr, yr = make_batch(8, 1)
    xf, yf = make_batch(8, 2)
    gr, gf = map(flat, reference_grads(model, xr, yr, xf, yf))
    g = torch.stack([gr, gf]).double()
    gram = _two_player_bargainer(model, xr, yr, xf, yf)._gram()
    assert torch.allclose(torch.tensor(gram, dtype=torch.float64), g @ g.T, rtol=1e-6)


def _rule_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        gen = torch.Generator().manual_seed(100 + rank)  # every rank sees different local losses
        rule = SatisfactionRule(target=0.25, ema=0.8, hysteresis=1.5)
        decisions = []
        for n in range(80):
            shape = 1.0 if n < 5 else (0.05 if n < 50 else 0.6)
            local = shape * (0.2 + 1.6 * torch.rand((), generator=gen, dtype=torch.float32))
            decisions.append(rule.update(local, all_reduce=True))
        torch.save({"decisions": decisions, "state": rule.state_dict()},
                   Path(out_dir) / f"rule{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_satisfaction_rule_decides_the_same_on_every_rank(tmp_path):
    mp.spawn(_rule_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rule0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rule1.pt", weights_only=False)
    assert r0["decisions"] == r1["decisions"] and r0["state"] == r1["state"]
    assert 0.0 in r0["decisions"] and r0["decisions"][-1] == 1.0  # it left and came back
    # = one process fed the global mean of the two ranks' losses
    gens = [torch.Generator().manual_seed(100 + r) for r in range(2)]
    rule = SatisfactionRule(target=0.25, ema=0.8, hysteresis=1.5)
    single = []
    for n in range(80):
        shape = 1.0 if n < 5 else (0.05 if n < 50 else 0.6)
        local = [shape * (0.2 + 1.6 * torch.rand((), generator=g, dtype=torch.float32)) for g in gens]
        single.append(rule.update((local[0] + local[1]) / 2))
    assert single == r0["decisions"]
