"""Which distributed set-ups an unlearning run accepts, decided once for every front end.

MUNBa needs one backward pass per player before a single optimizer step. DeepSpeed's engine
steps the optimizer inside its backward pass, so it can never run it. FSDP shards gradients:
bargaining would need the Gram matrix all-reduced over the shards (``NashBargainer`` has
``all_reduce_gram`` for it), which no test covers yet, so bargaining methods refuse it; a
constant weighting (the weighted sum, fine-tuning, ...) only sums gradients and can run.
The check reads accelerate's launch environment, so it runs before any model is loaded.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

__all__ = ["unsupported_distributed_message", "DEEPSPEED_MESSAGE", "FSDP_MESSAGE",
           "FSDP_UNSHARDED_MESSAGE"]

DEEPSPEED_MESSAGE = ("DeepSpeed is not supported: its backward pass also steps the optimizer, but "
                     "MUNBa needs one backward pass per player (retain, forget) before each step. "
                     "Use DDP (`accelerate config` without DeepSpeed).")
FSDP_MESSAGE = ("FSDP is not supported with bargaining yet: sharded gradients need the Gram "
                "matrix all-reduced across ranks, which is untested here. Use DDP.")
FSDP_UNSHARDED_MESSAGE = ("FSDP is not supported by this trainer: its checkpoint hooks and export "
                          "assume unsharded weights. Use DDP.")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def unsupported_distributed_message(*, bargains: bool = True, argv: Sequence[str] = (),
                                    distributed_type: Optional[str] = None,
                                    sharded_weights: bool = True) -> Optional[str]:
    """The one-line reason this launch cannot run, or None.

    ``bargains``: whether the method combines gradients by bargaining (FSDP is refused only
    then). ``argv``: the command line (a ``--deepspeed`` flag counts). ``distributed_type``:
    accelerate's ``DistributedType`` (or its value) once an ``Accelerator`` exists; otherwise the
    launch environment (``ACCELERATE_USE_DEEPSPEED`` / ``ACCELERATE_USE_FSDP``) decides.
    ``sharded_weights``: False for a front end whose saving assumes whole weights (the SD
    trainer's checkpoint hooks and export): FSDP is then refused for every method.
    """
    kind = getattr(distributed_type, "value", distributed_type)
    kind = str(kind).upper() if kind is not None else None
    deepspeed = kind == "DEEPSPEED" or _env_flag("ACCELERATE_USE_DEEPSPEED") or any(
        a == "--deepspeed" or a.startswith("--deepspeed=") for a in argv)
    if deepspeed:
        return DEEPSPEED_MESSAGE
    fsdp = kind == "FSDP" or _env_flag("ACCELERATE_USE_FSDP")
    if fsdp and not sharded_weights:
        return FSDP_UNSHARDED_MESSAGE
    if fsdp and bargains:
        return FSDP_MESSAGE
    return None
