"""The paper's other baselines (iu, be, bs, shs) each do what defines them.

As in test_method_behaviour.py, one plain SGD step (no momentum, no clipping) on whole-set batches
moves the weights by exactly ``-lr * g``; each test rebuilds ``g`` (or, for IU, the one edit) by
hand: BE's logits gain one shadow class and D_f is trained into it, and the saved model has the
original classes; BS trains D_f towards the FGSM nearest wrong class; IU takes no step and moves
the weights by ``alpha F^-1 g_f`` (checked against the Sherman-Morrison recursion of WoodFisher);
SHs re-initialises exactly the top share by connection sensitivity and projects its steps.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from hf_munba.classification.baselines import (BoundaryExpanding, logits_head,
                                               woodfisher_inverse_product)
from hf_munba.classification.methods import ClassifierContext, get_method
from hf_munba.classification.trainer import MunbaArguments, MunbaTrainer
from hf_munba.testing import tiny_vit_classifier
from test_method_behaviour import LR, NUM_CLASSES, assert_update, deltas, grads, one_step, stream_order
from trainer_helpers import targs, tiny_classification_data


def _context(ds, seed=0):
    """A ClassifierContext whose forget set is ``ds`` as one batch (a fresh dict per pass)."""
    return ClassifierContext(lambda: iter([{"pixel_values": ds["pixel_values"], "labels": ds["labels"]}]),
                             MunbaTrainer.model_logits, seed)


def test_be_trains_d_f_into_one_shadow_class_and_saves_the_original_classes(tmp_path):
    forget, retain = tiny_classification_data()
    w0, w1, tr = one_step(tmp_path, "be", forget, retain)
    # the shadow row as it started (the method's seeded init), on a copy of the original weights
    probe = copy.deepcopy(w0)
    be = BoundaryExpanding(None)
    be.setup(probe, _context(forget))
    x = forget["pixel_values"][stream_order(tr)]
    with be.shadow_class():
        assert probe(pixel_values=x).logits.shape[-1] == NUM_CLASSES + 1  # one shadow class
    assert probe(pixel_values=x).logits.shape[-1] == NUM_CLASSES  # only inside the forget pass
    head0 = logits_head(probe)
    shadow0 = [head0.munba_shadow_weight.detach().clone(), head0.munba_shadow_bias.detach().clone()]
    # by hand: CE of the C+1 logits against the shadow label C, through the original weights
    feats = {}
    handle = logits_head(w0).register_forward_hook(lambda m, a, out: feats.update(h=a[0]))  # returns None
    sw, sb = (s.clone().requires_grad_(True) for s in shadow0)
    logits = w0(pixel_values=x).logits
    z = torch.cat([logits, F.linear(feats["h"], sw, sb)], dim=-1)
    handle.remove()
    params = list(w0.parameters())
    g = torch.autograd.grad(F.cross_entropy(z, torch.full((len(x),), NUM_CLASSES)), params + [sw, sb])
    assert_update(deltas(w0, w1), list(g[:len(params)]))
    assert_update([tr.method.shadow["munba_shadow_weight"] - shadow0[0],
                   tr.method.shadow["munba_shadow_bias"] - shadow0[1]], list(g[len(params):]))
    # the retain set plays no part (BE uses D_f only) and the shadow class is gone after training
    assert "loss_retain" not in tr.state.log_history[0]
    assert set(w1.state_dict()) == set(w0.state_dict()) and w1.config.num_labels == NUM_CLASSES
    tr.save_model(str(tmp_path / "saved"))
    again = type(w0).from_pretrained(str(tmp_path / "saved"))
    assert again.config.num_labels == NUM_CLASSES
    for k, v in w1.state_dict().items():
        assert torch.equal(again.state_dict()[k], v)


def test_be_refuses_a_model_without_a_linear_logits_layer():
    class NoHead(torch.nn.Module):
        def forward(self, pixel_values):
            return pixel_values

    with pytest.raises(ValueError, match="nn.Linear with config.num_labels"):
        BoundaryExpanding(None).setup(NoHead(), None)


def _fgsm_nearest_wrong(model, x, y, eps):
    x = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(F.cross_entropy(model(pixel_values=x).logits, y), x)
    with torch.no_grad():
        adv = model(pixel_values=x + eps * gx.sign()).logits
    wrong = adv.clone()
    wrong[torch.arange(len(y)), y] = float("-inf")
    return adv.argmax(-1), wrong.argmax(-1)


@pytest.mark.parametrize("eps", [0.1, 2.0])
def test_bs_trains_d_f_towards_the_fgsm_nearest_wrong_class(tmp_path, eps):
    forget, retain = tiny_classification_data()
    w0, w1, tr = one_step(tmp_path, "bs", forget, retain, bs_epsilon=eps)
    idx = stream_order(tr)
    x, y = forget["pixel_values"][idx], forget["labels"][idx]
    adversarial, target = _fgsm_nearest_wrong(w0, x, y, eps)
    assert (target != y).all()  # never the true class ...
    crossed = adversarial != y
    assert torch.equal(target[crossed], adversarial[crossed])  # ... the FGSM prediction where it crossed
    assert_update(deltas(w0, w1), grads(w0, x, target))
    assert "loss_retain" not in tr.state.log_history[0]


def _sherman_morrison_inverse_product(v, samples, damping):
    """WoodFisher's recursion (Singh & Alistarh 2020): F_0^-1 = I / damping,
    F_k^-1 = F_{k-1}^-1 - u_k u_k^T / (K + g_k . u_k) with u_k = F_{k-1}^-1 g_k, kept as the
    rank-one terms (u_k, K + g_k . u_k) instead of P x P matrices."""
    k, terms = len(samples), []

    def apply(x):  # F_n^-1 x for the terms so far
        return x / damping - sum((u * (u @ x) / den for u, den in terms), torch.zeros_like(x))

    for g in samples.double():
        u = apply(g)
        terms.append((u, k + g @ u))
    return apply(v.double())


def test_woodfisher_inverse_product_is_the_recursion_and_the_inverse():
    gen = torch.Generator().manual_seed(0)
    samples, v = torch.randn(5, 30, generator=gen), torch.randn(30, generator=gen)
    for damping in (1.0, 1e-3):
        fisher = damping * torch.eye(30, dtype=torch.float64) + samples.double().T @ samples.double() / 5
        exact = torch.linalg.solve(fisher, v.double())
        torch.testing.assert_close(woodfisher_inverse_product(v, samples, damping).double(), exact,
                                   rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(_sherman_morrison_inverse_product(v, samples, damping), exact)


def _flat(gs):
    return torch.cat([g.flatten() for g in gs])


def test_iu_moves_the_weights_by_the_influence_step_without_training(tmp_path):
    forget, retain = tiny_classification_data()  # 12 forget, 36 retain samples
    model = tiny_vit_classifier(num_labels=NUM_CLASSES)
    w0 = copy.deepcopy(model)
    alpha, damping, k = 3.0, 0.5, 3
    tr = MunbaTrainer(model=model, args=targs(tmp_path, per_device_train_batch_size=8, max_steps=5),
                      train_dataset=retain, forget_dataset=forget,
                      munba_args=MunbaArguments(method="iu", iu_alpha=alpha, iu_damping=damping,
                                                iu_fisher_batches=k))
    out = tr.train()
    assert out.global_step == 0 and tr.state.log_history == [] and tr.optimizer is None  # no step
    # by hand: the mean CE gradient over D_f, the first k retain batches of the seeded order
    v = _flat(grads(w0, forget["pixel_values"], forget["labels"]))
    order = torch.randperm(len(retain), generator=torch.Generator().manual_seed(0))
    samples = torch.stack([_flat(grads(w0, retain["pixel_values"][b], retain["labels"][b]))
                           for b in order.split(8)[:k]])
    expected = alpha * _sherman_morrison_inverse_product(v, samples, damping).float()
    delta = _flat(deltas(w0, tr.model))
    torch.testing.assert_close(delta, expected, rtol=1e-3, atol=1e-5)
    assert tr.method.step_norm == pytest.approx(expected.norm().item(), rel=1e-4)


def test_shs_reinitialises_the_top_connection_sensitivity_share_and_projects(tmp_path):
    forget, retain = tiny_classification_data()
    ratio, lam = 0.1, 0.05
    w0 = tiny_vit_classifier(num_labels=NUM_CLASSES)
    shs = get_method("shs")(MunbaArguments(method="shs", shs_ratio=ratio, shs_lambda=lam))
    pruned = copy.deepcopy(w0)
    shs.setup(pruned, _context(forget))
    # connection sensitivity |w * grad CE(D_f)| (one batch), and the mask is exactly its top share
    g = grads(w0, forget["pixel_values"], forget["labels"])
    sens = _flat([(gi * p.detach()).abs() for gi, p in zip(g, w0.parameters())])
    torch.testing.assert_close(_flat(shs.sensitivity), sens)
    mask = _flat(shs.masks)
    assert mask.sum().item() == round(ratio * mask.numel())
    assert sens[mask].min() >= sens[~mask].max()
    # masked entries take a fresh initialisation's values, the others keep theirs
    torch.manual_seed(0)
    fresh = _flat([p.detach() for p in type(w0)(w0.config).parameters()])
    before, after = _flat([p.detach() for p in w0.parameters()]), _flat([p.detach() for p in pruned.parameters()])
    assert torch.equal(after[~mask], before[~mask]) and torch.equal(after[mask], fresh[mask])
    # the constraint: the gradient of -CE(D_f) at the trimmed weights; a step against it is projected
    g_o = _flat(grads(pruned, forget["pixel_values"], forget["labels"], sign=-1.0))
    torch.testing.assert_close(_flat([shs.constraint[id(p)] for p in pruned.parameters()]), g_o)
    params = list(pruned.parameters())
    for d0 in (-g_o + 0.1 * torch.randn_like(g_o), g_o + 0.1 * torch.randn_like(g_o)):
        start = 0
        for p in params:
            p.grad = d0[start:start + p.numel()].view_as(p).clone()
            start += p.numel()
        shs.edit_gradients(params)
        d = _flat([p.grad for p in params])
        if d0 @ g_o < 0:
            assert abs((d @ g_o).item()) < 1e-4 * (d0.norm() * g_o.norm()).item()
            torch.testing.assert_close(d, d0 - (d0 @ g_o) / (g_o @ g_o) * g_o)
        else:
            assert torch.equal(d, d0)  # a step that keeps the forget loss from falling is left alone

    # through the trainer: one step from the trimmed weights = -lr * project(g_r + lam * g_ga)
    w0b, w1, tr = one_step(tmp_path, "shs", forget, retain, copy.deepcopy(w0), shs_ratio=ratio,
                           shs_lambda=lam)
    idx = stream_order(tr)
    g_r = _flat(grads(pruned, retain["pixel_values"], retain["labels"]))
    g_f = _flat(grads(pruned, forget["pixel_values"][idx], forget["labels"][idx], sign=-1.0))
    d = g_r + lam * g_f
    if d @ g_o < 0:
        d = d - (d @ g_o) / (g_o @ g_o) * g_o
    torch.testing.assert_close(_flat(deltas(pruned, w1)), -LR * d, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("bad, word", [(dict(iu_alpha=0.0), "iu_alpha"), (dict(iu_damping=-1.0), "iu_damping"),
                                       (dict(iu_fisher_batches=0), "iu_fisher_batches"),
                                       (dict(bs_epsilon=0.0), "bs_epsilon"), (dict(shs_ratio=0.0), "shs_ratio"),
                                       (dict(shs_ratio=1.5), "shs_ratio"), (dict(shs_lambda=0), "shs_lambda")])
def test_a_bad_baseline_setting_fails_before_any_model_work(bad, word):
    with pytest.raises(ValueError, match=word):
        MunbaArguments(**bad)


def test_be_resumes_exactly_with_its_shadow_row(tmp_path):
    """A checkpoint holds the shadow row (it is a parameter for the run); resuming restores it, also
    for a ViT (whose checkpoints reload through from_pretrained, which knows no shadow row)."""
    forget, retain = tiny_classification_data()
    model = tiny_vit_classifier(num_labels=NUM_CLASSES)

    def trainer(folder, m):
        args = targs(folder, per_device_train_batch_size=8, max_steps=4, save_strategy="steps", save_steps=2)
        return MunbaTrainer(model=m, args=args, train_dataset=retain, forget_dataset=forget, method="be")

    full = trainer(tmp_path / "full", copy.deepcopy(model))
    full.train()
    resumed = trainer(tmp_path / "full", copy.deepcopy(model))  # the same folder: its checkpoint-2
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / "checkpoint-2"))
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    for name in BoundaryExpanding.SHADOW:
        assert torch.equal(full.method.shadow[name], resumed.method.shadow[name])
