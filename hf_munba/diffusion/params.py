"""Which weights of a Stable Diffusion pipeline an unlearning run may change.

Subsets follow the ESD / MUNBa conventions on UNet parameter names:

* ``full``      every UNet parameter;
* ``noxattn``   everything except cross-attention (``attn2``), the time embedding and ``conv_out``
                (the paper's nudity setting: the concept stays reachable through the prompt, the
                image prior is edited);
* ``xattn``     cross-attention only (the paper's class-wise setting: edit how prompts steer);
* ``selfattn``  self-attention (``attn1``) only.

The joint-attention transformers of SD 3 and Flux (component ``transformer``) have no separate
cross-attention: text and image tokens attend together, each stream with its own projections.
There the text stream's attention projections (``add_q_proj``, ``add_k_proj``, ``add_v_proj``,
``to_add_out``: how the prompt's tokens enter every joint block) play the role of ``attn2``:

* ``xattn``     the text-stream attention projections of every joint (double-stream) block;
* ``noxattn``   the image stream: everything except the text stream (those projections,
                ``ff_context``, ``norm1_context``, ``context_embedder``), the timestep / pooled-text
                embedding (``time_text_embed``) and the output layers (``norm_out``, ``proj_out``);
                Flux's single-stream blocks, which carry both, are in it;
* ``selfattn``  the image stream's attention projections (``to_q``, ``to_k``, ``to_v``, ``to_out``).

For the text encoder, ``full`` trains every parameter and ``selfattn`` the self-attention blocks
(CLIP's ``self_attn``, T5's ``SelfAttention``).
LoRA adapters go on the attention projections inside the chosen subset, through peft's
``LoraConfig`` and the models' own ``add_adapter`` (so diffusers can save and reload them).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

__all__ = ["UNET_SUBSETS", "TRANSFORMER_SUBSETS", "TEXT_ENCODER_SUBSETS", "select_parameter_names",
           "freeze_all_but", "add_lora_adapter", "lora_target_modules",
           "enable_gradient_checkpointing"]

UNET_SUBSETS = ("full", "noxattn", "xattn", "selfattn")
TEXT_ENCODER_SUBSETS = ("full", "selfattn")

_UNET_RULES: Dict[str, Callable[[str], bool]] = {
    "full": lambda n: True,
    "noxattn": lambda n: not ("attn2" in n or n.startswith("time_embedding")
                              or n.startswith("conv_out")),
    "xattn": lambda n: "attn2" in n,
    "selfattn": lambda n: "attn1" in n,
}
_TEXT_RULES: Dict[str, Callable[[str], bool]] = {
    "full": lambda n: True,
    "selfattn": lambda n: ".self_attn." in n or ".SelfAttention." in n,
}
_TEXT_STREAM_ATTN = (".attn.add_q_proj.", ".attn.add_k_proj.", ".attn.add_v_proj.",
                     ".attn.to_add_out.")
_TEXT_STREAM = _TEXT_STREAM_ATTN + (".ff_context.", ".norm1_context.")
_IMAGE_ATTN = (".attn.to_q.", ".attn.to_k.", ".attn.to_v.", ".attn.to_out.")


def _under(n: str, parts) -> bool:
    return any(p in "." + n for p in parts)


_TRANSFORMER_RULES: Dict[str, Callable[[str], bool]] = {
    "full": lambda n: True,
    "noxattn": lambda n: not (_under(n, _TEXT_STREAM) or n.startswith(
        ("context_embedder", "time_text_embed", "norm_out", "proj_out"))),
    "xattn": lambda n: _under(n, _TEXT_STREAM_ATTN),
    "selfattn": lambda n: _under(n, _IMAGE_ATTN),
}
TRANSFORMER_SUBSETS = tuple(_TRANSFORMER_RULES)
_UNET_LORA_LEAVES = ("to_q", "to_k", "to_v", "to_out.0")
_TRANSFORMER_LORA_LEAVES = _UNET_LORA_LEAVES + ("add_q_proj", "add_k_proj", "add_v_proj",
                                                "to_add_out")
_TEXT_LORA_LEAVES = ("q_proj", "k_proj", "v_proj", "out_proj",  # CLIP
                     "SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o")  # T5
_LEAVES = {"unet": _UNET_LORA_LEAVES, "transformer": _TRANSFORMER_LORA_LEAVES,
           "text_encoder": _TEXT_LORA_LEAVES}


def _rules(component: str) -> Dict[str, Callable[[str], bool]]:
    if component == "unet":
        return _UNET_RULES
    if component == "transformer":
        return _TRANSFORMER_RULES
    if component.startswith("text_encoder"):  # text_encoder, text_encoder_2, text_encoder_3
        return _TEXT_RULES
    raise ValueError(f"unknown component {component!r}; expected 'unet', 'transformer' or a "
                     "text encoder")


def select_parameter_names(model: torch.nn.Module, subset: str, component: str = "unet") -> List[str]:
    """Names of ``model``'s parameters in ``subset`` (raises on an unknown or empty subset)."""
    rules = _rules(component)
    if subset not in rules:
        raise ValueError(f"unknown parameter subset {subset!r} for the {component}; "
                         f"choose one of {sorted(rules)}")
    names = [n for n, _ in model.named_parameters() if rules[subset](n)]
    if not names:
        raise ValueError(f"parameter subset {subset!r} selects nothing in this {component}")
    return names


def freeze_all_but(model: torch.nn.Module, names: List[str]) -> List[torch.nn.Parameter]:
    """Freeze ``model`` except ``names``; return the trainable parameters as a list (not a filter)."""
    wanted = set(names)
    model.requires_grad_(False)
    params = []
    for n, p in model.named_parameters():
        if n in wanted:
            p.requires_grad_(True)
            params.append(p)
    return params


def lora_target_modules(model: torch.nn.Module, subset: str, component: str = "unet") -> List[str]:
    """Full names of the attention projection layers inside ``subset`` (LoRA targets)."""
    rule = _rules(component)[subset] if subset in _rules(component) else None
    if rule is None:
        raise ValueError(f"unknown parameter subset {subset!r} for the {component}")
    leaves = _LEAVES["text_encoder" if component.startswith("text_encoder") else component]
    targets = [n for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and any(n.endswith("." + l) for l in leaves)
               and rule(n + ".weight")]
    if not targets:
        raise ValueError(f"no attention projections for LoRA in subset {subset!r} of the {component}")
    return targets


def add_lora_adapter(model: torch.nn.Module, *, rank: int, alpha: Optional[float] = None,
                     subset: str = "full", component: str = "unet",
                     dropout: float = 0.0) -> List[torch.nn.Parameter]:
    """Freeze ``model``, add a peft LoRA adapter ("default") on the subset's attention projections.

    ``alpha`` defaults to ``rank`` (scale 1). Returns the adapter's parameters as a list.
    """
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank}")
    alpha = rank if alpha is None else alpha
    alpha = int(alpha) if float(alpha).is_integer() else float(alpha)
    config = LoraConfig(r=rank, lora_alpha=alpha,
                        lora_dropout=dropout, init_lora_weights="gaussian",
                        target_modules=lora_target_modules(model, subset, component))
    model.requires_grad_(False)
    model.add_adapter(config)
    return [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Turn on activation checkpointing for a diffusers or transformers model.

    MUNBa runs one backward pass per player, and each recomputes its own checkpointed forward,
    so the bargained step is unchanged (tested). transformers renamed the switch to
    ``activation_checkpointing_enable`` (the old name warns until v6); both are accepted.
    """
    for name in ("enable_gradient_checkpointing", "activation_checkpointing_enable",
                 "gradient_checkpointing_enable"):
        switch = getattr(model, name, None)
        if switch is not None:
            switch()
            return
    raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
