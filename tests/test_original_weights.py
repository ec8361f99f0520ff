"""The original model without a copy: OriginalWeights swaps the trained parameters' first values
in for a no-grad forward, and SDUnlearner's original (distilled retain loss, frozen target) built
on it gives what a frozen deepcopy gives."""

import copy

import pytest
import torch

from hf_munba.diffusion.original_weights import OriginalWeights, choose_original
from hf_munba.diffusion.params import freeze_all_but, select_parameter_names
from hf_munba.diffusion.unlearner import SDUnlearner
from hf_munba.testing import tiny_sd_pipeline
from sd_helpers import paired_batch

torch.set_num_threads(1)


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def test_swapped_runs_the_original_and_restores_the_trained_values():
    model = _mlp()
    x = torch.randn(5, 4)
    with torch.no_grad():
        before = model(x)
    trained = [model[2].weight, model[2].bias]  # a subset, as --train_params picks one
    ow = OriginalWeights(trained)
    assert ow.num_bytes == sum(p.numel() * 4 for p in trained)
    with torch.no_grad():
        for p in trained:
            p.add_(1.0)
    after = model(x).detach()
    assert not torch.allclose(after, before)
    ids = [id(p) for p in model.parameters()]
    with ow.swapped():
        out = model(x)
        assert not out.requires_grad  # no graph can record the swapped values
        assert torch.equal(out, before)
    assert [id(p) for p in model.parameters()] == ids  # the same Parameter objects
    assert torch.equal(model(x), after)
    # a backward after the swap sees the trained values (a graph built before the swap too)
    y = model(x).sum()
    with ow.swapped():
        model(x)
    y.backward()
    ref = copy.deepcopy(model)
    ref.zero_grad()
    ref(x).sum().backward()
    assert torch.equal(model[2].weight.grad, ref[2].weight.grad)


def test_swapped_restores_on_error_and_refuses_misuse():
    model = _mlp()
    trained = list(model[0].parameters())
    ow = OriginalWeights(trained)
    with torch.no_grad():
        trained[0].mul_(2.0)
    current = trained[0].detach().clone()
    with pytest.raises(ZeroDivisionError):
        with ow.swapped():
            1 / 0
    assert torch.equal(trained[0], current)
    with pytest.raises(RuntimeError, match="nested"):
        with ow.swapped():
            with ow.swapped():
                pass
    assert torch.equal(trained[0], current)
    model.double()  # moved after the copy was taken: one clear error, weights untouched
    with pytest.raises(RuntimeError, match="after the model's last"):
        with ow.swapped():
            pass
    assert trained[0].dtype == torch.float64
    with pytest.raises(ValueError, match="no parameters"):
        OriginalWeights([])
    with pytest.raises(ValueError, match="twice"):
        OriginalWeights([trained[0], trained[0]])


def _unlearners(pipe, subset="xattn", **kw):
    """The same original two ways: a frozen deepcopy of the UNet, and the trained parameters'
    first values (what the training script uses for a subset)."""
    frozen = copy.deepcopy(pipe.unet).requires_grad_(False)
    pipe.unet.requires_grad_(False)
    params = freeze_all_but(pipe.unet, select_parameter_names(pipe.unet, subset))
    ow = OriginalWeights(params)
    common = (pipe.unet, pipe.text_encoder, pipe.vae, pipe.scheduler)
    return (SDUnlearner(*common, frozen_unet=frozen, **kw),
            SDUnlearner(*common, original_weights=ow, **kw), params)


def _loss_and_grads(fn, params, batch):
    for p in params:
        p.grad = None
    torch.manual_seed(0)
    loss = fn(batch)
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in params]


@pytest.mark.parametrize("subset", ["xattn", "full"])
def test_distilled_retain_loss_with_original_weights_equals_a_frozen_copy(subset):
    pipe = tiny_sd_pipeline()
    by_copy, by_swap, params = _unlearners(pipe, subset, retain_objective="distill")
    b = paired_batch(pipe)
    loss, grads = _loss_and_grads(by_swap.retain_loss, params, b)
    assert loss == 0.0 and all(float(g.abs().max()) == 0.0 for g in grads)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.1)
    moved = [p.detach().clone() for p in params]
    a = _loss_and_grads(by_copy.retain_loss, params, b)
    s = _loss_and_grads(by_swap.retain_loss, params, b)
    assert s[0] > 0 and s[0] == pytest.approx(a[0], rel=1e-6)
    for ga, gs in zip(a[1], s[1]):
        torch.testing.assert_close(gs, ga, rtol=1e-5, atol=1e-8)
    assert all(torch.equal(p, m) for p, m in zip(params, moved))  # trained values back


@pytest.mark.parametrize("objective", ["remap", "esd"])
def test_frozen_target_with_original_weights_equals_a_frozen_copy(objective):
    pipe = tiny_sd_pipeline()
    by_copy, by_swap, params = _unlearners(pipe, forget_objective=objective,
                                           target_model="frozen", negative_guidance=2.0)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.1)
    b = paired_batch(pipe)
    a = _loss_and_grads(by_copy.forget_loss, params, b)
    s = _loss_and_grads(by_swap.forget_loss, params, b)
    assert s[0] == pytest.approx(a[0], rel=1e-6)
    for ga, gs in zip(a[1], s[1]):
        torch.testing.assert_close(gs, ga, rtol=1e-5, atol=1e-8)


def test_distilled_retain_loss_on_a_trained_text_encoder_with_original_weights():
    pipe = tiny_sd_pipeline()
    pipe.unet.requires_grad_(False)
    frozen = copy.deepcopy(pipe.text_encoder).requires_grad_(False)
    params = list(pipe.text_encoder.parameters())
    common = (pipe.unet, pipe.text_encoder, pipe.vae, pipe.scheduler)
    kw = dict(train_component="text_encoder", retain_objective="distill")
    by_copy = SDUnlearner(*common, frozen_text_encoder=frozen, **kw)
    by_swap = SDUnlearner(*common, original_weights=OriginalWeights(params), **kw)
    b = paired_batch(pipe)
    assert _loss_and_grads(by_swap.retain_loss, params, b)[0] == 0.0
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.05)
    a = _loss_and_grads(by_copy.retain_loss, params, b)
    s = _loss_and_grads(by_swap.retain_loss, params, b)
    assert s[0] > 0 and s[0] == pytest.approx(a[0], rel=1e-6)
    for ga, gs in zip(a[1], s[1]):
        torch.testing.assert_close(gs, ga, rtol=1e-5, atol=1e-8)


def test_one_original_model_only():
    pipe = tiny_sd_pipeline()
    ow = OriginalWeights(pipe.unet.parameters())
    common = (pipe.unet, pipe.text_encoder, pipe.vae, pipe.scheduler)
    with pytest.raises(ValueError, match="one original model"):
        SDUnlearner(*common, retain_objective="distill", original_weights=ow,
                    frozen_unet=copy.deepcopy(pipe.unet))
    with pytest.raises(ValueError, match="one original model"):
        SDUnlearner(*common, retain_objective="distill", original_weights=ow, lora=True)


def test_the_original_runs_in_eval_mode_and_the_trained_mode_comes_back():
    """As a frozen copy in eval mode did: the original is deterministic (no dropout draws)."""
    pipe = tiny_sd_pipeline()
    _, by_swap, _ = _unlearners(pipe, retain_objective="distill")
    pipe.unet.train()
    modes = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, a: modes.append(m.training))
    by_swap.retain_loss(paired_batch(pipe))
    hook.remove()
    assert modes == [False, True]  # the original's forward, then the trained one
    assert all(m.training for m in pipe.unet.modules())


def test_the_first_distilled_loss_is_exactly_zero_under_bf16_autocast():
    """Mixed precision as the training script sets it up (frozen modules and the conditioning in
    bf16, the trained UNet in fp32, under autocast): the original is the same module in the same
    dtypes, so the first loss and gradient are exactly zero, and a later loss is not."""
    pipe = tiny_sd_pipeline()
    pipe.vae.to(torch.bfloat16)
    pipe.text_encoder.to(torch.bfloat16)
    _, by_swap, params = _unlearners(pipe, "full", retain_objective="distill",
                                     weight_dtype=torch.bfloat16)
    b = paired_batch(pipe)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _loss_and_grads(by_swap.retain_loss, params, b)

    loss, grads = step()
    assert loss == 0.0 and all(float(g.abs().max()) == 0.0 for g in grads)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.1)
    assert step()[0] > 0


def test_gradient_checkpointing_recomputes_with_the_trained_values():
    """Checkpointed blocks recompute their forward in backward, after the swap is undone: the
    distilled gradient is the one without checkpointing."""
    from hf_munba.diffusion.params import enable_gradient_checkpointing

    grads = []
    for checkpointing in (False, True):
        pipe = tiny_sd_pipeline()
        _, by_swap, params = _unlearners(pipe, "noxattn", retain_objective="distill")
        with torch.no_grad():
            for i, p in enumerate(params):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.05)
        if checkpointing:
            enable_gradient_checkpointing(pipe.unet)
        pipe.unet.train()
        block = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0]
        calls = []
        block.register_forward_pre_hook(lambda *_: calls.append(1))
        loss, g = _loss_and_grads(by_swap.retain_loss, params, paired_batch(pipe))
        assert loss > 0 and len(calls) == (3 if checkpointing else 2)  # original, trained(, again)
        grads.append(g)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-8)


def test_the_cheaper_original_is_chosen():
    """A subset's fp32 values, or a copy of the module in the compute dtype when that is smaller
    (most of the module trained under 16-bit mixed precision); the exact one on a tie."""
    layer = torch.nn.Linear(10, 10)  # 110 parameters
    f32, bf16 = torch.float32, torch.bfloat16
    assert choose_original(layer, [layer.bias], trained_dtype=f32, compute_dtype=bf16) == "weights"
    assert choose_original(layer, layer.parameters(), trained_dtype=f32,
                           compute_dtype=bf16) == "copy"
    assert choose_original(layer, layer.parameters(), trained_dtype=f32,
                           compute_dtype=f32) == "weights"
    assert choose_original(layer, [layer.weight], trained_dtype=f32,
                           compute_dtype=torch.float16) == "copy"  # 400 bytes > 220
