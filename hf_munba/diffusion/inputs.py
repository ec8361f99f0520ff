"""Checks of the SD script's inputs that need no model weights: the base pipeline path, the learning
rate schedule, the checkpoint to resume from.

Each raises ``ValueError`` with one line a user can act on, so the script can refuse bad input
before it loads a model or creates its output directory. Why each exists:

* a folder that is not a diffusers pipeline (a classifier, a single UNet) used to fail only after
  the output directory was made, with ``OSError: no scheduler_config.json``;
* a mistyped local path (``./models/sd14``) used to be taken for a Hub repo id and spent about a
  minute in Hub retries before failing;
* an unknown ``--lr_scheduler`` used to raise a traceback after the models were loaded;
* a checkpoint folder not named ``checkpoint-N`` used to crash with an ``AttributeError``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import List, Optional, Sequence

__all__ = ["SD_COMPONENTS", "LR_SCHEDULERS", "looks_like_local_path", "check_pretrained_pipeline",
           "CHECKPOINT_RE", "CHECKPOINT_STATE", "resolve_checkpoint", "checkpoint_step"]

SD_COMPONENTS = ("tokenizer", "scheduler", "text_encoder", "vae", "unet")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
CHECKPOINT_STATE = "munba_state.json"


def _lr_schedulers() -> List[str]:
    # diffusers' get_scheduler names; piecewise_constant needs step rules the script has no flag for
    from diffusers.optimization import SchedulerType

    return [s.value for s in SchedulerType if s.value != "piecewise_constant"]


LR_SCHEDULERS = tuple(_lr_schedulers())


def looks_like_local_path(path: str) -> bool:
    """True for what cannot be a Hub repo id (``name`` or ``org/name``) or is meant as a path.

    Absolute paths, paths starting with ``.`` or ``~``, paths with a backslash or more than one
    ``/``, and paths whose first component exists here (``models/sd`` next to a ``models``
    folder) are local.
    """
    p = str(path)
    if os.path.isabs(p) or p.startswith((".", "~")) or "\\" in p or p.count("/") > 1:
        return True
    first = Path(p).parts[0] if Path(p).parts else p
    return "/" in p and os.path.exists(first)


def check_pretrained_pipeline(path: str, components: Optional[Sequence[str]] = None) -> bool:
    """Refuse a base model that cannot be a pipeline hf_munba unlearns; True if it is local.

    A local folder must hold ``model_index.json`` of a supported pipeline class (SD 1.x/2.x,
    SDXL, SD 3, Flux: :mod:`hf_munba.diffusion.families`) naming each of ``components``
    (default: what that family trains with), each with its subfolder; a path that looks local
    (see :func:`looks_like_local_path`) must exist. A Hub repo id is left to the loader (it may
    be in the cache, or reachable).
    """
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        if looks_like_local_path(str(path)):
            raise ValueError(f"--pretrained_model_name_or_path {path}: no such folder (a Hub repo id "
                             "looks like 'org/name')")
        return False
    if not p.is_dir():
        raise ValueError(f"--pretrained_model_name_or_path {path} is a file; give a diffusers "
                         "pipeline folder (with model_index.json) or a Hub repo id")
    index = p / "model_index.json"
    if not index.is_file():
        hint = (" It holds a config.json: a single model (e.g. a classifier or a UNet), not a "
                "pipeline." if (p / "config.json").is_file() else "")
        raise ValueError(f"--pretrained_model_name_or_path {path} is not a diffusers pipeline folder "
                         f"(no model_index.json).{hint} Save one with pipe.save_pretrained(...)")
    try:
        listed = json.loads(index.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{index} is not valid JSON ({e})") from None
    if components is None:
        from .families import family_for_pipeline_class

        try:
            family = family_for_pipeline_class(listed.get("_class_name", "")
                                               if isinstance(listed, dict) else "")
        except ValueError as e:
            raise ValueError(f"--pretrained_model_name_or_path {path}: {e}") from None
        components = ("scheduler", "vae", family.denoiser,
                      *(x for s in family.text_encoders for x in (s.tokenizer, s.encoder)))
    missing = [c for c in components if c not in listed or not (p / c).is_dir()]
    if missing:
        raise ValueError(f"--pretrained_model_name_or_path {path} is not a Stable Diffusion pipeline: "
                         f"no {', '.join(missing)} (model_index.json names "
                         f"{sorted(k for k in listed if not k.startswith('_'))})")
    return True


def resolve_checkpoint(spec: Optional[str], output_dir: str | os.PathLike) -> Optional[Path]:
    """The checkpoint folder ``--resume_from_checkpoint spec`` means, or None.

    ``"latest"``: the highest ``output_dir/checkpoint-N`` (None if there is none). Otherwise a
    folder (as given, or inside ``output_dir``) saved by the script, whatever its name: it must
    hold ``munba_state.json``. Raises ``ValueError`` for anything else.
    """
    if not spec:
        return None
    out = Path(output_dir)
    if spec == "latest":
        if not out.is_dir():
            return None
        found = sorted((int(CHECKPOINT_RE.match(d.name).group(1)), d) for d in out.iterdir()
                       if d.is_dir() and CHECKPOINT_RE.match(d.name))
        return found[-1][1] if found else None
    ckpt = Path(spec)
    if not ckpt.is_dir():
        ckpt = out / spec
    if not ckpt.is_dir():
        raise ValueError(f"--resume_from_checkpoint {spec}: checkpoint does not exist")
    if not (ckpt / CHECKPOINT_STATE).is_file():
        raise ValueError(f"--resume_from_checkpoint {spec} is not a checkpoint saved by this script "
                         f"(no {CHECKPOINT_STATE}); give a checkpoint-N folder or 'latest'")
    return ckpt


def checkpoint_step(ckpt: str | os.PathLike) -> int:
    """The optimizer step a checkpoint was saved at: recorded in its state file (older
    checkpoints: the last history entry, else the ``checkpoint-N`` name)."""
    ckpt = Path(ckpt)
    state = json.loads((ckpt / CHECKPOINT_STATE).read_text())
    if "global_step" in state:
        return int(state["global_step"])
    if state.get("history"):
        return int(state["history"][-1]["step"])
    m = CHECKPOINT_RE.match(ckpt.name)
    if m is None:
        raise ValueError(f"cannot tell the step of checkpoint {ckpt}")
    return int(m.group(1))
