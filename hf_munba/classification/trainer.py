"""``MunbaTrainer``: machine unlearning for classifiers on the ``transformers.Trainer`` loop.

Users keep their Trainer habits (``TrainingArguments``, datasets with ``pixel_values`` and
``labels``, callbacks, checkpoints, ``accelerate launch``). The retain set is the Trainer's
``train_dataset`` so an epoch covers D_r once; the forget set is a second, independently
shuffled stream that cycles. Each micro-batch runs one backward pass per player; on the last
micro-batch of an optimizer step the two accumulated gradients are bargained (method
``munba``) and the Trainer then clips and steps as usual. Hooking in at ``training_step`` (and
not re-writing the loop) keeps every Trainer feature working: gradient accumulation
(``accelerator.sync_gradients`` marks the last micro-batch), DDP ``no_sync``, autocast,
GradScaler, clipping, logging, evaluation, saving, resuming.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterator, List, Optional

import torch

from ..bargaining import (DEFAULT_OPPOSED_TOL, BargainingStatus, NashBargainer, SatisfactionRule,
                         build_forget_rule)
from .objectives import FORGET_LOSSES
from .methods import UnlearningMethod, available_methods, get_method

from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

__all__ = ["MunbaArguments", "MunbaTrainer", "ForgetStream", "NonFiniteTrainingError",
           "MUNBA_STATE_NAME", "last_complete_checkpoint"]

MUNBA_STATE_NAME = "munba_state.json"


def last_complete_checkpoint(folder: str) -> Optional[str]:
    """The newest ``checkpoint-N`` in ``folder`` that a killed run finished writing, or None.

    ``transformers.trainer_utils.get_last_checkpoint`` takes the highest N even if the process
    died while writing it. A checkpoint is complete when it has our state (written first) and a
    parseable ``trainer_state.json`` (the Trainer writes it after weights, optimizer and RNG).
    """
    if not os.path.isdir(folder):
        return None
    found = []
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if not (name.startswith(PREFIX_CHECKPOINT_DIR + "-") and name.split("-")[-1].isdigit()
                and os.path.isdir(path)):
            continue
        try:
            with open(os.path.join(path, "trainer_state.json")) as f:
                json.load(f)
            with open(os.path.join(path, MUNBA_STATE_NAME)) as f:
                json.load(f)
        except (OSError, ValueError):
            continue
        found.append((int(name.split("-")[-1]), path))
    return max(found)[1] if found else None


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive optimizer steps had non-finite gradients."""


@dataclass
class MunbaArguments:
    """Unlearning options of :class:`MunbaTrainer` (everything else is ``TrainingArguments``)."""

    method: str = field(default="munba", metadata={
        "help": f"unlearning method, one of {available_methods()}"})
    forget_loss: Optional[str] = field(default=None, metadata={
        "help": f"forget loss, one of {sorted(FORGET_LOSSES)}; default: the method's own "
                "(random_label for munba/weighted/rl/salun, neg_ce for ga)"})
    forget_weight: float = field(default=1.0, metadata={
        "help": "lam in L_r + lam * L_f for method 'weighted' (MUNBa is invariant to it)"})
    forget_batch_size: Optional[int] = field(default=None, metadata={
        "help": "forget micro-batch size per device; default per_device_train_batch_size"})
    l1_alpha: float = field(default=5e-4, metadata={"help": "l1 penalty of method 'l1'"})
    salun_ratio: float = field(default=0.5, metadata={
        "help": "share of weights SalUn updates (most salient for D_f)"})
    opposed_tol: float = field(default=DEFAULT_OPPOSED_TOL, metadata={
        "help": "smallest 1 + cos(g_r, g_f) still bargained; below it the fallback player steps"})
    fallback_player: Optional[int] = field(default=0, metadata={
        "help": "player followed when no direction helps both (0 retain, 1 forget, None skip)"})
    max_consecutive_skips: int = field(default=10, metadata={
        "help": "stop with an error after this many consecutive non-finite steps"})
    bargaining_power_forget: float = field(default=1.0, metadata={
        "help": "method 'munba': the forget player's bargaining power (retain has 1) while it is "
                "not satisfied; 1 = the paper's symmetric game"})
    forget_target: Optional[float] = field(default=None, metadata={
        "help": "method 'munba': the forget player leaves the game once an EMA of its loss is at "
                "or below this target; default per forget loss (none for random_label and "
                "neg_ce: see hf_munba.bargaining.DEFAULT_FORGET_TARGETS)"})
    forget_target_mode: Optional[str] = field(default=None, metadata={
        "help": "'relative' (a fraction of the first steps' mean loss; scale-free) or "
                "'absolute' (a loss value); default: the forget loss's default, else absolute"})
    forget_target_ema: float = field(default=0.9, metadata={
        "help": "smoothing of the forget loss before the comparison, in [0, 1)"})
    forget_target_hysteresis: float = field(default=1.5, metadata={
        "help": "a satisfied forget player comes back above this factor times the target"})
    forget_target_reference_steps: int = field(default=1, metadata={
        "help": "relative targets: the number of first optimizer steps averaged as reference"})
    satisfied_power_forget: float = field(default=0.01, metadata={
        "help": "the forget player's power while satisfied (0: it leaves the game; the default "
                "0.01 follows retain without undoing the forgetting to first order)"})

    def __post_init__(self):
        get_method(self.method)  # raises with the list of methods
        if self.forget_loss is not None and self.forget_loss not in FORGET_LOSSES:
            raise ValueError(f"unknown forget loss {self.forget_loss!r}; choose one of {sorted(FORGET_LOSSES)}")
        if not (math.isfinite(self.forget_weight) and self.forget_weight > 0):
            raise ValueError(f"forget_weight must be a positive number, got {self.forget_weight}")
        if self.forget_batch_size is not None and self.forget_batch_size < 1:
            raise ValueError(f"forget_batch_size must be >= 1, got {self.forget_batch_size}")
        if self.l1_alpha < 0:
            raise ValueError(f"l1_alpha must be >= 0, got {self.l1_alpha}")
        if not 0.0 < self.salun_ratio <= 1.0:
            raise ValueError(f"salun_ratio must be in (0, 1], got {self.salun_ratio}")
        if not 0.0 <= self.opposed_tol < 1.0:
            raise ValueError(f"opposed_tol must be in [0, 1), got {self.opposed_tol}")
        if self.fallback_player not in (None, 0, 1):
            raise ValueError(f"fallback_player must be 0, 1 or None, got {self.fallback_player}")
        if self.max_consecutive_skips < 1:
            raise ValueError("max_consecutive_skips must be >= 1")
        if not (math.isfinite(self.bargaining_power_forget) and self.bargaining_power_forget > 0):
            raise ValueError(f"bargaining_power_forget must be positive, got "
                             f"{self.bargaining_power_forget}")
        self.make_forget_rule()  # validates the target options (one clear ValueError)

    def make_forget_rule(self) -> Optional[SatisfactionRule]:
        """The forget player's satisfaction rule for a bargaining method, or None."""
        if not get_method(self.method).bargains:
            return None
        loss = self.forget_loss or get_method(self.method).default_forget_loss
        return build_forget_rule(
            loss, target=self.forget_target, mode=self.forget_target_mode,
            ema=self.forget_target_ema, hysteresis=self.forget_target_hysteresis,
            reference_steps=self.forget_target_reference_steps,
            satisfied_power=self.satisfied_power_forget, power=self.bargaining_power_forget)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


class ForgetStream:
    """An endless, seeded stream of forget batches: reshuffled every pass, sharded by rank.

    Its whole state is (pass, position), so checkpoints store two integers and a resumed run
    draws exactly the batches the uninterrupted run would have drawn. Pass ``k`` uses the
    permutation from ``seed`` and ``k``; rank ``r`` of ``w`` takes every ``w``-th entry.
    """

    def __init__(self, dataset, batch_size: int, collate_fn, seed: int,
                 rank: int = 0, world_size: int = 1):
        n = len(dataset)
        if n < world_size:
            raise ValueError(f"forget set has {n} samples, fewer than the {world_size} processes")
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.seed = int(seed)
        self.rank, self.world_size = rank, world_size
        self.shard_len = n // world_size
        self.batch_size = min(batch_size, self.shard_len)
        self.epoch = 0
        self.position = 0
        self.batches_drawn = 0

    def _order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.dataset), generator=g)
        return perm[self.rank::self.world_size][: self.shard_len]

    def next_indices(self) -> List[int]:
        out: List[int] = []
        while len(out) < self.batch_size:
            order = self._order(self.epoch)
            take = order[self.position: self.position + self.batch_size - len(out)].tolist()
            out += take
            self.position += len(take)
            if self.position >= self.shard_len:
                self.epoch, self.position = self.epoch + 1, 0
        self.batches_drawn += 1
        return out

    def __next__(self) -> Dict[str, Any]:
        return self.collate_fn([self.dataset[i] for i in self.next_indices()])

    def __iter__(self):
        return self

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.batches_drawn = int(state["batches_drawn"])


class MunbaTrainer(Trainer):
    """A ``transformers.Trainer`` that unlearns ``forget_dataset`` while keeping ``train_dataset``.

    ``train_dataset`` is the retain set D_r. With no unlearning options it runs the paper's
    method (``munba`` with the random-label forget loss). Logs ``loss_retain``,
    ``loss_forget`` and, for ``munba``, the bargaining ``munba/cos`` and ``munba/weight_*``.
    The loss logged as ``loss`` is L_r + L_f (for ``ga``: -CE on D_f). The number of steps
    always follows the retain loader (epochs x |D_r| / batch), also for ``ga``, which ignores
    the retain batches: give ``ga`` a ``max_steps``.
    """

    def __init__(self, model=None, args=None, *, forget_dataset=None,
                 munba_args: Optional[MunbaArguments] = None, method: Optional[str] = None,
                 forget_loss: Optional[str] = None, forget_weight: Optional[float] = None,
                 **kwargs):
        munba_args = munba_args or MunbaArguments()
        overrides = {k: v for k, v in dict(method=method, forget_loss=forget_loss,
                                            forget_weight=forget_weight).items() if v is not None}
        if overrides:
            munba_args = MunbaArguments(**{**munba_args.to_dict(), **overrides})
        method_cls = get_method(munba_args.method)
        if method_cls.uses_forget:
            if forget_dataset is None:
                raise ValueError(f"method {munba_args.method!r} needs a forget_dataset")
            if len(forget_dataset) == 0:
                raise ValueError("forget_dataset is empty")
        train_dataset = kwargs.get("train_dataset")
        if method_cls.uses_retain and train_dataset is not None and len(train_dataset) == 0:
            raise ValueError("train_dataset (the retain set) is empty")
        if args is not None and getattr(args, "fp16", False) and not torch.cuda.is_available():
            raise ValueError("fp16 mixed precision needs a CUDA GPU; on CPU use bf16 or fp32")
        super().__init__(model=model, args=args, **kwargs)
        if self.is_deepspeed_enabled:
            raise ValueError(
                "MunbaTrainer does not support DeepSpeed: its backward pass also steps the "
                "optimizer, but MUNBa needs two backward passes (retain, forget) per step. "
                "Use DDP through `accelerate config` instead.")
        if self.is_fsdp_enabled and method_cls.bargains:
            raise ValueError(
                "MunbaTrainer does not support FSDP for method 'munba' yet: sharded gradients need "
                "the Gram all-reduced across ranks, which is untested here. Use DDP.")
        self.munba_args = munba_args
        self.method: UnlearningMethod = method_cls(munba_args)
        self.forget_dataset = forget_dataset
        self.bargainer: Optional[NashBargainer] = None
        self.forget_rule: Optional[SatisfactionRule] = None
        self._forget_stream: Optional[ForgetStream] = None
        self.num_nonfinite_steps = 0
        self._consecutive_skips = 0
        self._logs_acc: Dict[str, List[float]] = {}
        self._step_losses = [0.0, 0.0]
        self._step_skipped = False
        self._step_nonfinite = False

    # ------------------------------------------------------------------ data
    def _forget_collator(self):
        collator = self.data_collator
        if self.args.remove_unused_columns and hasattr(self, "_get_collator_with_removed_columns"):
            collator = self._get_collator_with_removed_columns(collator, description="forget")
        return collator

    def _new_forget_stream(self) -> ForgetStream:
        bs = self.munba_args.forget_batch_size or self.args.per_device_train_batch_size
        return ForgetStream(self.forget_dataset, bs, self._forget_collator(), self.args.seed,
                            rank=self.args.process_index, world_size=self.args.world_size)

    def iter_forget_batches_once(self) -> Iterator[Dict[str, Any]]:
        """Every forget sample once, in order, on the model's device (for method setup)."""
        bs = self.munba_args.forget_batch_size or self.args.per_device_train_batch_size
        collate = self._forget_collator()
        for start in range(0, len(self.forget_dataset), bs):
            rows = [self.forget_dataset[i] for i in range(start, min(start + bs, len(self.forget_dataset)))]
            yield self._prepare_inputs(collate(rows))

    @staticmethod
    def model_logits(model, inputs: Dict[str, Any]) -> torch.Tensor:
        out = model(**{k: v for k, v in inputs.items() if k != "labels"})
        return out.logits if hasattr(out, "logits") else out[0]

    # -------------------------------------------------------------- training
    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        # Method setup (SalUn's mask, retrain's re-initialisation) sees the weights the user
        # passed in, before any checkpoint is loaded, so a resumed run prepares identically.
        self.method.setup(self, self.model)
        if self.method.uses_forget:
            self._forget_stream = self._new_forget_stream()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("the model has no trainable parameters")
        self.bargainer = None
        if self.method.bargains:
            self.bargainer = NashBargainer(trainable, num_players=2,
                                           opposed_tol=self.munba_args.opposed_tol,
                                           fallback_player=self.munba_args.fallback_player)
            self.forget_rule = self.munba_args.make_forget_rule()
        if resume_from_checkpoint is True or resume_from_checkpoint == "latest":
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no complete checkpoint in {self.args.output_dir} to resume from")
        if isinstance(resume_from_checkpoint, str) and self.args.max_steps > 0:
            from transformers.trainer_callback import TrainerState
            from transformers.trainer_utils import TrainOutput

            state_file = os.path.join(resume_from_checkpoint, "trainer_state.json")
            state = TrainerState.load_from_json(state_file) if os.path.isfile(state_file) else None
            if state is not None and state.global_step >= self.args.max_steps:
                # The run had finished (e.g. it was killed while writing its final model). The
                # Trainer would still run one more forward/backward/step from here; only restore.
                self._load_from_checkpoint(resume_from_checkpoint)
                self.state = state
                return TrainOutput(state.global_step, 0.0, {})
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        self._reload_renamed_weights(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, MUNBA_STATE_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"{resume_from_checkpoint} has no {MUNBA_STATE_NAME}: it was not "
                             "written by MunbaTrainer and cannot be resumed exactly")
        with open(path) as f:
            state = json.load(f)
        if state.get("method") != self.munba_args.method:
            raise ValueError(f"checkpoint was trained with method {state.get('method')!r}, "
                             f"not {self.munba_args.method!r}")
        if self._forget_stream is not None and state.get("forget_stream"):
            self._forget_stream.load_state_dict(state["forget_stream"])
        self.num_nonfinite_steps = int(state.get("num_nonfinite_steps", 0))
        if self.bargainer is not None:
            for k in ("num_steps", "num_skipped", "num_fallbacks"):
                setattr(self.bargainer, k, int(state.get("bargainer", {}).get(k, 0)))
        if self.forget_rule is not None and state.get("forget_rule"):
            self.forget_rule.load_state_dict(state["forget_rule"])

    def _reload_renamed_weights(self, checkpoint: str, model=None) -> None:
        """The Trainer restores ``model.safetensors`` with a plain ``load_state_dict(strict=False)``,
        but transformers 5 saves some models (ViT among them) under their legacy parameter names
        and renames them only inside ``from_pretrained``: every renamed weight would silently keep
        its current value. Such checkpoints are reloaded through ``from_pretrained``."""
        from safetensors import safe_open
        from transformers import PreTrainedModel

        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        weights = os.path.join(checkpoint, "model.safetensors")
        if not isinstance(model, PreTrainedModel) or not os.path.isfile(weights):
            return
        with safe_open(weights, framework="pt") as f:
            saved = set(f.keys())
        if saved <= set(model.state_dict()):
            return
        loaded = type(model).from_pretrained(checkpoint, use_safetensors=True,
                                             dtype=next(model.parameters()).dtype)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        if missing or unexpected:
            raise ValueError(f"{checkpoint} does not match the model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")

    def _munba_state(self) -> Dict[str, Any]:
        state = {"method": self.munba_args.method, "munba_args": self.munba_args.to_dict(),
                 "num_nonfinite_steps": self.num_nonfinite_steps}
        if self._forget_stream is not None:
            state["forget_stream"] = self._forget_stream.state_dict()
        if self.bargainer is not None:
            state["bargainer"] = {k: getattr(self.bargainer, k)
                                  for k in ("num_steps", "num_skipped", "num_fallbacks")}
        if self.forget_rule is not None:
            state["forget_rule"] = self.forget_rule.state_dict()
        return state

    def _save_checkpoint(self, model, trial):
        # Written before the Trainer's files, so a checkpoint whose trainer_state.json exists
        # (the Trainer's last file; see last_complete_checkpoint) always has ours too.
        if self.args.should_save:
            out = os.path.join(self._get_output_dir(trial=trial),
                               f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(out, exist_ok=True)
            tmp = os.path.join(out, MUNBA_STATE_NAME + ".tmp")
            with open(tmp, "w") as f:
                json.dump(self._munba_state(), f, indent=2)
            os.replace(tmp, os.path.join(out, MUNBA_STATE_NAME))
        super()._save_checkpoint(model, trial)

    def _save(self, output_dir=None, state_dict=None):
        super()._save(output_dir, state_dict=state_dict)
        self._save_extras(output_dir if output_dir is not None else self.args.output_dir)

    def _save_extras(self, output_dir: str) -> None:
        """Arguments as redacted JSON: the Trainer pickles TrainingArguments (hub_token included)
        into training_args.bin; we drop that file so no token and no pickle ends up on disk."""
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        bin_path = os.path.join(output_dir, "training_args.bin")
        if os.path.exists(bin_path):
            os.remove(bin_path)
        args = json.loads(self.args.to_json_string())
        for key in list(args):
            if "token" in key.lower():
                args[key] = None
        with open(os.path.join(output_dir, "training_args.json"), "w") as f:
            json.dump(args, f, indent=2, sort_keys=True)
        with open(os.path.join(output_dir, "munba_args.json"), "w") as f:
            f.write(self.munba_args.to_json_string())

    def _player(self, index: int):
        return self.bargainer.player(index) if self.bargainer is not None else contextlib.nullcontext()

    def _guard_skipped_steps(self) -> None:
        """Make the Trainer's ``optimizer.step()`` a no-op on a skipped step, and tell it so.

        The Trainer always calls ``optimizer.step()`` after the last micro-batch. Clearing
        ``.grad`` is not enough: under a GradScaler the zeroed or scaled gradients still reach
        the optimizer, and an optimizer that decays or moves parameters without a gradient would
        change them. So a skipped step never calls the optimizer at all: weights and optimizer
        state (momentum buffers, Adam moments and step counts) stay bitwise untouched. The step
        is reported through accelerate's ``optimizer_step_was_skipped`` (as for a GradScaler
        overflow), so the Trainer does not advance the learning-rate schedule either: the
        schedule counts the updates really made. A GradScaler still learns from the step: after
        non-finite gradients it backs off its scale; after a finite skip (opposed players with
        ``fallback_player=None``) it keeps it. The wrapper is an instance attribute of the
        accelerate optimizer (installed once); checkpointed ``state_dict()`` is unaffected.
        """
        optimizer = self.optimizer
        if optimizer is None or getattr(optimizer, "_munba_skip_guard", False):
            return
        if not hasattr(optimizer, "_is_overflow"):
            raise RuntimeError("MunbaTrainer needs accelerate's AcceleratedOptimizer (its step_was_skipped "
                               "flag) to skip optimizer steps; got " + type(optimizer).__name__)
        real_step = optimizer.step

        @functools.wraps(real_step)  # keeps the marks torch's LR scheduler put on step()
        def step(*args, **kwargs):
            if not self._step_skipped:
                optimizer._is_overflow = False  # a GradScaler step sets it again itself
                return real_step(*args, **kwargs)
            scaler = getattr(self.accelerator, "scaler", None)
            if scaler is not None:  # also clears the scaler's per-step state (unscale_ by clipping)
                scale = scaler.get_scale()
                scaler.update(new_scale=scale * scaler.get_backoff_factor() if self._step_nonfinite else scale)
            optimizer._is_overflow = True  # -> accelerator.optimizer_step_was_skipped: no scheduler step
            return None

        optimizer.step = step
        optimizer._munba_skip_guard = True

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._guard_skipped_steps()
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        div = float(self.current_gradient_accumulation_steps)
        total = torch.zeros((), device=self.args.device)
        if self.method.uses_retain:
            inputs = self._prepare_inputs(inputs)
            labels = inputs["labels"]
            with self.compute_loss_context_manager():
                loss_r = self.method.retain_loss(model, self.model_logits(model, inputs), labels) / div
            del inputs
            with self._player(0):
                self.accelerator.backward(loss_r)
            total = total + loss_r.detach()
            self._step_losses[0] = self._step_losses[0] + loss_r.detach()
        if self.method.uses_forget:
            stream = self._forget_stream
            gen = torch.Generator().manual_seed(
                (self.args.seed * 1_000_003 + stream.batches_drawn) * 131 + self.args.process_index)
            f_inputs = self._prepare_inputs(next(stream))
            labels = f_inputs["labels"]
            with self.compute_loss_context_manager():
                loss_f = self.method.forget_loss(model, self.model_logits(model, f_inputs), labels,
                                                 generator=gen) / div
            del f_inputs
            with self._player(1):
                self.accelerator.backward(loss_f)
            total = total + loss_f.detach()
            self._step_losses[1] = self._step_losses[1] + loss_f.detach()
        if self.accelerator.sync_gradients:
            self._finish_gradients()
        return total

    def _finish_gradients(self) -> None:
        """Once per optimizer step, before the Trainer clips and steps."""
        params = self.bargainer.params if self.bargainer is not None else [
            p for p in self.model.parameters() if p.requires_grad]
        scaler = getattr(self.accelerator, "scaler", None)
        logs = {}
        if self.method.uses_retain:
            logs["loss_retain"] = float(self._step_losses[0])
        if self.method.uses_forget:
            logs["loss_forget"] = float(self._step_losses[1])
        step_forget_loss = self._step_losses[1]  # this rank's mean over the micro-batches
        self._step_losses = [0.0, 0.0]
        if self.bargainer is not None:
            powers = None
            if self.forget_rule is not None:
                # one decision per optimizer step, on the loss averaged over ranks too
                if not isinstance(step_forget_loss, torch.Tensor):
                    step_forget_loss = torch.tensor(float(step_forget_loss), device=self.args.device)
                powers = [1.0, self.forget_rule.update(step_forget_loss,
                                                       all_reduce=self.args.world_size > 1)]
            elif self.munba_args.bargaining_power_forget != 1.0:
                powers = [1.0, self.munba_args.bargaining_power_forget]
            stats = self.bargainer.combine(grad_scale=scaler.get_scale() if scaler is not None else None,
                                           powers=powers)
            logs.update(stats.to_log_dict())
            if self.forget_rule is not None:
                logs.update(self.forget_rule.log_dict())
            skipped = stats.skipped
            nonfinite = stats.status is BargainingStatus.NONFINITE
        else:
            grads = [p.grad for p in params if p.grad is not None]
            skipped = nonfinite = bool(grads) and not bool(torch.isfinite(
                torch.stack(torch._foreach_norm(grads)).sum()))
        # read by the optimizer-step guard (_guard_skipped_steps) the Trainer calls right after this
        self._step_skipped, self._step_nonfinite = bool(skipped), bool(nonfinite)
        if skipped:
            self.num_nonfinite_steps += 1
            self._consecutive_skips += 1
            if scaler is None:
                for p in params:  # optimizers leave parameters without .grad untouched
                    p.grad = None
            if self._consecutive_skips >= self.munba_args.max_consecutive_skips:
                raise NonFiniteTrainingError(
                    f"{self._consecutive_skips} consecutive optimizer steps had non-finite or no "
                    f"usable gradients (step {self.state.global_step}); lower the learning rate, "
                    "check the data for NaN, or use bf16/fp32 instead of fp16")
        else:
            self._consecutive_skips = 0
            self.method.edit_gradients(self, params)
        logs["munba/nonfinite_steps_total"] = float(self.num_nonfinite_steps)
        for k, v in logs.items():
            if v is not None:
                self._logs_acc.setdefault(k, []).append(float(v))

    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        if "loss" in logs and self._logs_acc:
            for k, vals in self._logs_acc.items():
                finite = [v for v in vals if math.isfinite(v)]
                if k.endswith("_total"):
                    logs[k] = vals[-1]
                elif finite:
                    logs[k] = sum(finite) / len(finite)
            self._logs_acc = {}
        super().log(logs, start_time)
