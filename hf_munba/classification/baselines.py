"""The MUNBa paper's remaining classification baselines: IU, BE, BS and SHs (its Table 5).

Each is one class in the one method registry, so ``MunbaTrainer(method=...)``,
``training/train_munba_classifier.py --method ...`` and the digits benchmark run it like any other:

* ``iu`` - influence unlearning (Koh & Liang 2017; Izzo et al. 2021) with the WoodFisher inverse
  (Singh & Alistarh 2020): one step ``w += alpha F^-1 grad L(D_f)``, no training.
* ``be`` - boundary expanding (Chen et al., CVPR 2023): one shadow class, D_f trained towards it,
  the shadow class removed afterwards.
* ``bs`` - boundary shrinking (same paper): D_f trained towards its nearest wrong class, found by
  one FGSM step (epsilon 0.1) on the original model.
* ``shs`` - Scissorhands (Wu & Harandi 2024): re-initialise the weights most sensitive to D_f
  (connection sensitivity |w * grad|), then repair with L_r - lambda CE(D_f) under a gradient
  constraint that the repair never lowers the forget loss to first order.

They need three things the shared hooks lack, kept to the classifier front end (the trainer calls
them if a method defines them): ``forget_batch_loss`` (a method's own loss on a forget batch: BE's
extra logit, BS's per-batch labels), ``finish`` (after training, before the model is saved: BE
drops its shadow class) and ``trains = False`` (IU acts in ``setup`` and takes no step).
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Callable, ClassVar, Dict, List

import torch
import torch.nn.functional as F

from ..unlearning.methods import MethodSetting, UnlearningMethod, register_method
from .methods import FRONT_END, ClassifierContext, forget_gradients, reinitialise_, top_share_masks

__all__ = ["ClassifierMethod", "InfluenceUnlearning", "BoundaryExpanding", "BoundaryShrinking",
           "Scissorhands", "woodfisher_inverse_product", "nearest_wrong_labels", "logits_head"]

Logits = Callable[[torch.nn.Module, Dict[str, Any]], torch.Tensor]


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _trainable(model: torch.nn.Module) -> List[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class ClassifierMethod(UnlearningMethod):
    """Base of the classifier-only baselines: the defaults of the three classifier hooks."""

    front_ends = (FRONT_END,)
    #: False: ``setup`` is the whole method; the trainer then takes no optimizer step
    trains: ClassVar[bool] = True

    def forget_batch_loss(self, model: torch.nn.Module, inputs: Dict[str, Any],
                          labels: torch.Tensor, *, logits: Logits,
                          default: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The forget player's loss on one batch (``default``: the configured forget loss)."""
        return default(logits(model, inputs), labels)

    def finish(self, model: torch.nn.Module) -> None:
        """After training (also a failed run), before the model is saved."""


# ---- IU ------------------------------------------------------------------------------------
def woodfisher_inverse_product(v: torch.Tensor, samples: torch.Tensor, damping: float) -> torch.Tensor:
    """``F^-1 v`` for the dampened empirical Fisher ``F = damping I + (1/K) sum_k g_k g_k^T``.

    ``samples`` holds the K gradients g_k as rows (K x P). WoodFisher builds ``F^-1`` by K
    Sherman-Morrison rank-one updates; applied to one vector they collapse into Woodbury's
    identity, exact and without any P x P matrix:
    ``F^-1 v = (v - G^T (K damping I + G G^T)^-1 G v) / damping`` (a K x K solve, in float64).
    """
    k = samples.shape[0]
    g = samples.double()
    gram = g @ g.T + (k * damping) * torch.eye(k, dtype=torch.float64, device=g.device)
    coef = torch.linalg.solve(gram, g @ v.double())
    return ((v.double() - g.T @ coef) / damping).to(v.dtype)


@register_method("iu")
class InfluenceUnlearning(ClassifierMethod):
    """Influence unlearning: remove D_f's influence in one Newton-like step, without training.

    Removing D_f from the training objective moves its optimum by about
    ``H^-1 grad L(D_f)`` (Koh & Liang 2017; Izzo et al. 2021). The Hessian is the WoodFisher
    estimate (Singh & Alistarh 2020): the dampened empirical Fisher of per-batch retain gradients
    (:func:`woodfisher_inverse_product`), so the step barely disturbs the directions D_r relies
    on. Update: ``w += iu_alpha * F^-1 g_f``, g_f the mean cross-entropy gradient over D_f.
    The reference implementation (Unlearn-Sparse ``Wfisher.py``) keeps only one direction in its
    recursion (its ``o_vec`` stays parallel to the first sample); this is the exact inverse.
    """

    summary = "influence unlearning: one WoodFisher step w += alpha F^-1 grad L(D_f), no training"
    uses_forget = True
    trains = False
    settings = {
        "iu_alpha": MethodSetting(
            10.0, "method 'iu': the influence step's scale alpha (the reference uses 10 on CIFAR-10)",
            float, _positive, "a positive number"),
        "iu_damping": MethodSetting(
            1.0, "method 'iu': the Fisher's damping lambda (F = lambda I + mean g g^T; 1 = the "
            "reference's identity start)", float, _positive, "a positive number"),
        "iu_fisher_batches": MethodSetting(
            64, "method 'iu': retain batches (per_device_train_batch_size each, a seeded random "
            "order) whose gradients estimate the Fisher; memory: this many copies of the weights",
            int, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    }

    def setup(self, model, context: ClassifierContext):
        if context.retain_batches is None:
            raise ValueError("method 'iu' needs the retain set (its Fisher samples)")
        params = _trainable(model)
        was_training = model.training
        model.eval()
        try:
            g_f = [torch.zeros_like(p) for p in params]
            n_f = 0
            for batch in context.forget_batches():
                labels = batch.pop("labels")
                loss = F.cross_entropy(context.logits(model, batch).float(), labels, reduction="sum")
                for acc, g in zip(g_f, torch.autograd.grad(loss, params, allow_unused=True)):
                    if g is not None:
                        acc.add_(g)
                n_f += len(labels)
            v = torch.cat([g.flatten() for g in g_f]).float() / max(n_f, 1)
            samples = []
            for batch in context.retain_batches():
                if len(samples) == self.setting("iu_fisher_batches"):
                    break
                labels = batch.pop("labels")
                loss = F.cross_entropy(context.logits(model, batch).float(), labels)
                g = torch.autograd.grad(loss, params, allow_unused=True)
                samples.append(torch.cat([(torch.zeros_like(p) if gi is None else gi).flatten().float()
                                          for p, gi in zip(params, g)]))
        finally:
            model.train(was_training)
        if not samples:
            raise ValueError("method 'iu': the retain set is empty")
        step = self.setting("iu_alpha") * woodfisher_inverse_product(
            v, torch.stack(samples), self.setting("iu_damping"))
        self.step_norm = float(step.norm())
        with torch.no_grad():
            start = 0
            for p in params:
                p.add_(step[start:start + p.numel()].view_as(p).to(p.dtype))
                start += p.numel()


# ---- BE ------------------------------------------------------------------------------------
def logits_head(model: torch.nn.Module) -> torch.nn.Linear:
    """The linear layer that produces a classifier's logits: the last ``nn.Linear`` with
    ``config.num_labels`` outputs (``classifier`` of every transformers image classifier)."""
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == num_labels]
    if num_labels is None or not heads:
        raise ValueError("method 'be' needs a classifier whose logits come from an nn.Linear with "
                         "config.num_labels outputs (a transformers image classifier)")
    return heads[-1]


@register_method("be")
class BoundaryExpanding(ClassifierMethod):
    """Boundary expanding (Chen et al., CVPR 2023): a shadow class takes D_f, then goes.

    The final layer gains one output (the shadow class); D_f is fine-tuned towards it with
    cross-entropy over the C + 1 logits, which moves the forget samples out of their class's
    region; the shadow output is then dropped, leaving them spread over the other classes. Only
    D_f is used. The shadow row is a method-owned parameter pair (weight, bias) registered on the
    logits layer for the run (so the optimizer, clipping, checkpoints and resuming see it) and
    appended to that layer's output only inside the forget forward pass; the model's own head,
    config and every evaluation keep C classes, and :meth:`finish` removes the pair, so the saved
    model loads with ``from_pretrained`` unchanged. (Swapping in a C + 1 head would change
    ``config.num_labels`` for the run and need a copy back.) The row starts like a fresh
    ``nn.Linear`` row (seeded).
    """

    summary = "boundary expanding: D_f trained into one shadow class, removed after training"
    uses_retain = False
    uses_forget = True
    SHADOW = ("munba_shadow_weight", "munba_shadow_bias")

    def setup(self, model, context: ClassifierContext):
        head = logits_head(model)
        self.finish(model)  # a second run starts from a fresh shadow row
        fresh = torch.nn.Linear(head.in_features, 1, device=head.weight.device, dtype=head.weight.dtype)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(context.seed)
            fresh.reset_parameters()
        head.register_parameter(self.SHADOW[0], torch.nn.Parameter(fresh.weight.detach().clone()))
        head.register_parameter(self.SHADOW[1], torch.nn.Parameter(fresh.bias.detach().clone()))
        self.head, self.num_labels = head, head.out_features

    @contextlib.contextmanager
    def shadow_class(self):
        """Inside: the logits layer outputs C + 1 logits (the last one the shadow class)."""
        head = self.head

        def add_shadow(module, args, output):
            shadow = F.linear(args[0], getattr(module, self.SHADOW[0]), getattr(module, self.SHADOW[1]))
            return torch.cat([output, shadow.to(output.dtype)], dim=-1)

        handle = head.register_forward_hook(add_shadow)
        try:
            yield
        finally:
            handle.remove()

    def forget_batch_loss(self, model, inputs, labels, *, logits, default):
        with self.shadow_class():
            z = logits(model, inputs)
        shadow = torch.full_like(labels, self.num_labels)  # D_f relabelled to the shadow class
        return F.cross_entropy(z.float(), shadow)

    def finish(self, model):
        head = getattr(self, "head", None)
        if head is None:
            return
        self.shadow = {n: getattr(head, n).detach().clone() for n in self.SHADOW if hasattr(head, n)}
        for name in self.SHADOW:
            if name in head._parameters:
                delattr(head, name)


# ---- BS ------------------------------------------------------------------------------------
def nearest_wrong_labels(model: torch.nn.Module, inputs: Dict[str, Any], labels: torch.Tensor,
                         epsilon: float, logits: Logits) -> torch.Tensor:
    """Each sample's nearest wrong class: the top class other than its own at
    ``x + epsilon * sign(grad_x CE(model(x), y))`` (one FGSM step, Goodfellow et al. 2015).
    Where the step crosses the boundary this is the adversarial prediction (Chen et al.);
    where it does not, the runner-up there, so the label is never the true one."""
    with torch.enable_grad():
        x = inputs["pixel_values"].detach().clone().requires_grad_(True)
        loss = F.cross_entropy(logits(model, {**inputs, "pixel_values": x}).float(), labels)
        (grad,) = torch.autograd.grad(loss, x)
    with torch.no_grad():
        z = logits(model, {**inputs, "pixel_values": x.detach() + epsilon * grad.sign()}).float()
        z[torch.arange(len(labels), device=z.device), labels] = float("-inf")
        return z.argmax(-1)


@register_method("bs")
class BoundaryShrinking(ClassifierMethod):
    """Boundary shrinking (Chen et al., CVPR 2023): D_f relabelled to its nearest wrong class.

    For each forget batch, one FGSM step of size ``bs_epsilon`` (in the model's input units) on a
    frozen copy of the original model finds the class just across the nearest decision boundary
    (:func:`nearest_wrong_labels`); the model is fine-tuned with cross-entropy towards it, which
    shrinks the forget class's region. Only D_f is used. The copy is frozen, as in the reference,
    so the labels depend only on the sample; it costs one copy of the weights.
    """

    summary = "boundary shrinking: D_f trained towards its FGSM nearest wrong class"
    uses_retain = False
    uses_forget = True
    settings = {"bs_epsilon": MethodSetting(
        0.1, "method 'bs': the FGSM step that finds each forget sample's nearest wrong class (in the "
        "model's input units; the paper's 0.1)", float, _positive, "a positive number")}

    def setup(self, model, context: ClassifierContext):
        self.reference = copy.deepcopy(model).eval().requires_grad_(False)

    def forget_batch_loss(self, model, inputs, labels, *, logits, default):
        if "pixel_values" not in inputs:
            raise ValueError("method 'bs' perturbs the inputs: forget batches need 'pixel_values'")
        target = nearest_wrong_labels(self.reference, inputs, labels, self.setting("bs_epsilon"), logits)
        return F.cross_entropy(logits(model, inputs).float(), target)

    def finish(self, model):
        self.reference = None  # the copy is only needed while training


# ---- SHs -----------------------------------------------------------------------------------
@register_method("shs")
class Scissorhands(ClassifierMethod):
    """Scissorhands (Wu & Harandi 2024): trim what D_f relies on, then repair under a constraint.

    Setup: connection sensitivity (SNIP, Lee et al. 2019) of every trainable weight for D_f,
    ``|w| * sum_batches |grad CE(D_f)|``; the top ``shs_ratio`` share is re-initialised to the
    values of a fresh initialisation of the model (its config's own init scheme; the reference
    draws Kaiming values). Repair: ``L_r - shs_lambda * CE(D_f)`` (a constant weighted sum with
    the ``neg_ce`` forget loss), where a step whose gradient d would lower the forget loss to
    first order (``d . g_o < 0``, g_o the gradient of -CE(D_f) at the trimmed weights) is
    projected onto ``d . g_o = 0``. The reference solves GEM's dual with a fixed margin of 0.5, a
    scale-dependent push; this is the exact projection. Applied to every trainable parameter (the
    reference limits both steps to ResNet's last stages and head).
    """

    summary = "Scissorhands: re-initialise the weights most sensitive to D_f, repair under a constraint"
    uses_forget = True
    default_forget_loss = {"classification": "neg_ce"}
    settings = {
        "shs_ratio": MethodSetting(
            0.03, "method 'shs': share of weights re-initialised, the most sensitive to D_f (the "
            "reference's sparsity 0.97)", float,
            lambda v: isinstance(v, (int, float)) and 0.0 < v <= 1.0, "in (0, 1]"),
        "shs_lambda": MethodSetting(
            0.05, "method 'shs': weight of the forget term in L_r - lambda CE(D_f) (the reference's 0.05)",
            float, _positive, "a positive number"),
    }

    @property
    def forget_weight(self) -> float:
        return float(self.setting("shs_lambda"))

    def setup(self, model, context: ClassifierContext):
        params = _trainable(model)
        magnitude = forget_gradients(model, context, params)
        self.sensitivity = [(g * p.detach().abs()).float() for g, p in zip(magnitude, params)]
        self.masks = top_share_masks(self.sensitivity, self.setting("shs_ratio"))
        fresh = copy.deepcopy(model)
        reinitialise_(fresh, context.seed)
        fresh_params = dict(fresh.named_parameters())
        with torch.no_grad():
            for (name, p), mask in zip(((n, p) for n, p in model.named_parameters() if p.requires_grad),
                                       self.masks):
                p.copy_(torch.where(mask, fresh_params[name].to(p.dtype), p))
        del fresh, fresh_params
        self.constraint = {id(p): g for p, g in zip(params, forget_gradients(
            model, context, params, absolute=False, sign=-1.0))}

    def edit_gradients(self, params):
        pairs = [(p.grad, self.constraint[id(p)]) for p in params
                 if p.grad is not None and id(p) in self.constraint]
        if not pairs:
            return
        dot = sum((d.double() * g.double()).sum() for d, g in pairs)
        norm2 = sum(g.double().pow(2).sum() for _, g in pairs)
        if dot < 0 and norm2 > 0:
            scale = float(dot / norm2)
            for d, g in pairs:
                d.sub_(g.to(d.dtype), alpha=scale)
