"""Each unlearning method does what defines it, checked on the exact update of one SGD step.

One optimizer step of ``MunbaTrainer`` with plain SGD (no momentum, no weight decay, no clipping,
a constant learning rate) moves the weights by exactly ``-lr * g`` for the combined gradient
``g``; each test rebuilds ``g`` by hand from the player gradients the method is meant to use, so
a ``ga`` that also looked at D_r, a ``weighted`` that ignored lambda or a ``salun`` that updated
outside its mask fails. Every batch is the whole (tiny) set, so the trainer's shuffling does not
matter; a tiny ViT (LayerNorm, no dropout) keeps the forward pass free of batch statistics.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from hf_munba.classification import objectives
from hf_munba.classification.trainer import MunbaArguments, MunbaTrainer
from hf_munba.testing import tiny_vit_classifier
from trainer_helpers import targs, tiny_classification_data

LR = 0.1
NUM_CLASSES = 4


@pytest.fixture
def relabels(monkeypatch):
    """Records every call of the random relabelling: (true labels in, random labels out)."""
    calls = []
    real = objectives.random_labels

    def spy(labels, num_classes, generator=None):
        out = real(labels, num_classes, generator)
        calls.append((labels.detach().clone(), out.detach().clone()))
        return out

    monkeypatch.setattr(objectives, "random_labels", spy)
    return calls


def one_step(tmp_path, method, forget, retain, model=None, **munba):
    """(weights before, weights after, trainer) for one SGD step of ``method`` on whole-set batches."""
    model = model if model is not None else tiny_vit_classifier(num_labels=NUM_CLASSES)
    before = copy.deepcopy(model)
    args = targs(tmp_path, per_device_train_batch_size=64, max_steps=1, max_grad_norm=0.0,
                 learning_rate=LR)
    tr = MunbaTrainer(model=model, args=args, train_dataset=retain, forget_dataset=forget,
                      munba_args=MunbaArguments(method=method, **munba))
    tr.train()
    return before, tr.model, tr


def deltas(before, after):
    return [(a.detach() - b.detach()) for a, b in zip(after.parameters(), before.parameters())]


def grads(model, x, y, sign=1.0):
    """Gradient of sign * CE(model(x), y) w.r.t. every parameter (zeros where unused)."""
    params = list(model.parameters())
    loss = sign * F.cross_entropy(model(pixel_values=x).logits.float(), y)
    g = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, g)]


def stream_order(tr):
    """The forget indices of the trainer's first forget batch (its stream is seeded)."""
    return tr._new_forget_stream().next_indices()


def assert_update(delta, grad, **tol):
    for d, g in zip(delta, grad):
        torch.testing.assert_close(d, -LR * g, **{"atol": 1e-6, "rtol": 1e-4, **tol})


def poisoned(ds):
    ds = copy.deepcopy(ds)
    ds.columns["pixel_values"][:] = float("nan")
    return ds


def test_ga_uses_only_the_forget_set(tmp_path):
    forget, retain = tiny_classification_data()
    w0, w1, tr = one_step(tmp_path / "nan", "ga", forget, poisoned(retain))
    delta = deltas(w0, w1)
    assert all(torch.isfinite(d).all() for d in delta) and any(d.abs().sum() > 0 for d in delta)
    _, clean, _ = one_step(tmp_path / "clean", "ga", forget, retain)
    assert all(torch.equal(a, b) for a, b in zip(w1.parameters(), clean.parameters()))
    idx = stream_order(tr)
    assert_update(delta, grads(w0, forget["pixel_values"][idx], forget["labels"][idx], sign=-1.0))
    assert "loss_retain" not in tr.state.log_history[0]


def test_ft_uses_only_the_retain_set(tmp_path):
    forget, retain = tiny_classification_data()
    w0, w1, tr = one_step(tmp_path / "nan", "ft", poisoned(forget), retain)
    _, clean, _ = one_step(tmp_path / "clean", "ft", forget, retain)
    assert all(torch.equal(a, b) for a, b in zip(w1.parameters(), clean.parameters()))
    assert_update(deltas(w0, w1), grads(w0, retain["pixel_values"], retain["labels"]))
    assert "loss_forget" not in tr.state.log_history[0]


def test_weighted_scales_the_forget_gradient_by_lambda(tmp_path, relabels):
    forget, retain = tiny_classification_data()
    model = tiny_vit_classifier(num_labels=NUM_CLASSES)
    w0, w1, tr = one_step(tmp_path / "one", "weighted", forget, retain, copy.deepcopy(model),
                          forget_weight=1.0)
    _, w3, _ = one_step(tmp_path / "three", "weighted", forget, retain, copy.deepcopy(model),
                        forget_weight=3.0)
    assert len(relabels) == 2 and torch.equal(relabels[0][1], relabels[1][1])  # same random labels
    idx = stream_order(tr)
    g_f = grads(w0, forget["pixel_values"][idx], relabels[0][1])
    g_r = grads(w0, retain["pixel_values"], retain["labels"])
    assert_update(deltas(w0, w1), [a + b for a, b in zip(g_r, g_f)])
    # the two updates differ by exactly (3 - 1) times the forget gradient term
    diff = [a - b for a, b in zip(deltas(w0, w3), deltas(w0, w1))]
    assert_update(diff, [2.0 * g for g in g_f])


def test_rl_relabels_only_the_forget_set(tmp_path, relabels):
    forget, retain = tiny_classification_data()
    w0, w1, tr = one_step(tmp_path, "rl", forget, retain)
    assert len(relabels) == 1  # one forget batch; the retain batch is never relabelled
    idx = stream_order(tr)
    true, drawn = relabels[0]
    assert torch.equal(true, forget["labels"][idx])
    assert (drawn != true).all() and ((drawn >= 0) & (drawn < NUM_CLASSES)).all()
    g_r = grads(w0, retain["pixel_values"], retain["labels"])  # retain labels as they are
    g_f = grads(w0, forget["pixel_values"][idx], drawn)
    assert_update(deltas(w0, w1), [a + b for a, b in zip(g_r, g_f)])


def test_random_labels_are_never_the_true_label_and_cover_the_others():
    labels = torch.arange(NUM_CLASSES).repeat(500)
    drawn = objectives.random_labels(labels, NUM_CLASSES, torch.Generator().manual_seed(0))
    assert (drawn != labels).all()
    for c in range(NUM_CLASSES):
        assert set(drawn[labels == c].tolist()) == set(range(NUM_CLASSES)) - {c}


def test_salun_updates_only_the_most_salient_share(tmp_path, relabels):
    forget, retain = tiny_classification_data()
    ratio = 0.3
    w0, w1, tr = one_step(tmp_path, "salun", forget, retain, salun_ratio=ratio)
    masks = torch.cat([m.flatten() for m in tr.method.masks]).bool()
    n = masks.numel()
    assert masks.sum().item() == max(1, round(ratio * n))  # the unmasked share is salun_ratio
    # the mask is the top share of |grad CE(D_f)| at the original weights
    saliency = torch.cat([g.abs().flatten() for g in grads(w0, forget["pixel_values"], forget["labels"])])
    assert saliency[masks].min() >= saliency[~masks].max()
    delta = torch.cat([d.flatten() for d in deltas(w0, w1)])
    assert (delta[~masks] == 0).all() and (delta[masks] != 0).float().mean() > 0.5
    idx = stream_order(tr)
    g_r = grads(w0, retain["pixel_values"], retain["labels"])
    g_f = grads(w0, forget["pixel_values"][idx], relabels[0][1])
    expected = torch.cat([(a + b).flatten() for a, b in zip(g_r, g_f)]) * masks
    torch.testing.assert_close(delta, -LR * expected, atol=1e-6, rtol=1e-4)


def test_l1_adds_the_l1_term(tmp_path):
    forget, retain = tiny_classification_data()
    model = tiny_vit_classifier(num_labels=NUM_CLASSES)
    alpha = 0.01
    w0, l1, _ = one_step(tmp_path / "l1", "l1", forget, retain, copy.deepcopy(model), l1_alpha=alpha)
    _, ft, _ = one_step(tmp_path / "ft", "ft", forget, retain, copy.deepcopy(model))
    diff = [a - b for a, b in zip(deltas(w0, l1), deltas(w0, ft))]
    assert_update(diff, [alpha * torch.sign(p.detach()) for p in w0.parameters()], atol=1e-7)


def test_retrain_reinitialises_the_weights(tmp_path):
    forget, retain = tiny_classification_data()
    _, a, _ = one_step(tmp_path / "a", "retrain", forget, retain, tiny_vit_classifier(NUM_CLASSES, seed=0))
    w0, b, _ = one_step(tmp_path / "b", "retrain", forget, retain, tiny_vit_classifier(NUM_CLASSES, seed=7))
    # whatever it starts from, retrain steps from the same fresh initialisation (seed 0)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    torch.manual_seed(0)
    fresh = type(w0)(w0.config)
    assert not all(torch.equal(x, y) for x, y in zip(fresh.parameters(), w0.parameters()))
    assert_update(deltas(fresh, b), grads(fresh, retain["pixel_values"], retain["labels"]))


def _nash(g_r, g_f):
    """The closed-form Nash weights (DESIGN.md section 1) of two player gradients."""
    fr = torch.cat([g.flatten() for g in g_r]).double()
    ff = torch.cat([g.flatten() for g in g_f]).double()
    c = (fr @ ff / (fr.norm() * ff.norm())).item()
    return 1 / (fr.norm().item() * math.sqrt(1 + c)), 1 / (ff.norm().item() * math.sqrt(1 + c))


def test_munba_bargains(tmp_path, relabels):
    """The combined gradient is the Nash weights times the player gradients."""
    forget, retain = tiny_classification_data()
    w0, w1, tr = one_step(tmp_path, "munba", forget, retain)
    idx = stream_order(tr)
    g_r = grads(w0, retain["pixel_values"], retain["labels"])
    g_f = grads(w0, forget["pixel_values"][idx], relabels[0][1])
    a_r, a_f = _nash(g_r, g_f)
    logs = tr.state.log_history[0]
    assert logs["munba/weight_retain"] == pytest.approx(a_r, rel=1e-4)
    assert logs["munba/weight_forget"] == pytest.approx(a_f, rel=1e-4)
    assert_update(deltas(w0, w1), [a_r * r + a_f * f for r, f in zip(g_r, g_f)])


def test_munba_paper_has_no_satisfied_player_rule(tmp_path, relabels):
    """Options that make munba's forget player satisfied at once (and weaker) leave
    munba-paper the plain symmetric bargain."""
    forget, retain = tiny_classification_data()
    model = tiny_vit_classifier(num_labels=NUM_CLASSES)
    opts = dict(forget_target=100.0, forget_target_mode="absolute", bargaining_power_forget=0.5)
    w0, paper, tr = one_step(tmp_path / "paper", "munba-paper", forget, retain, copy.deepcopy(model), **opts)
    assert tr.forget_rule is None and tr.method.powers() is None
    _, munba, tr_munba = one_step(tmp_path / "munba", "munba", forget, retain, copy.deepcopy(model), **opts)
    assert tr_munba.forget_rule is not None and tr_munba.forget_rule.satisfied
    idx = stream_order(tr)
    g_r = grads(w0, retain["pixel_values"], retain["labels"])
    g_f = grads(w0, forget["pixel_values"][idx], relabels[0][1])
    a_r, a_f = _nash(g_r, g_f)
    assert_update(deltas(w0, paper), [a_r * r + a_f * f for r, f in zip(g_r, g_f)])
    assert not all(torch.allclose(x, y) for x, y in zip(paper.parameters(), munba.parameters()))
