#!/usr/bin/env python
"""Cost of one unlearning step: the plain sum (the floor) vs hf_munba's weighted and MUNBa steps vs the
reference approach.

A MUNBa step needs one backward pass per player; the plain sum L_r + L_f runs the same forwards
and one backward through both graphs, so it is the floor. ``weighted`` and ``munba`` time exactly
what users run: the registry's bargainer (a ConstantWeighting for ``--method weighted``, Nash
bargaining with the forget rule for ``--method munba``), one backward per player inside its
``player(i)`` block, then :func:`hf_munba.unlearning.unlearning_step` (clip, guarded Adam step).
The public reference code instead takes
two ``autograd.grad`` calls with ``retain_graph=True``, concatenates every gradient into flat
copies, runs a third backward on the weighted loss and flushes the CUDA cache each step. All
four run here side by side, interleaved step by step on one model, optimizer and batch stream,
and the median step time and peak memory are reported as ratios. For the SD configurations a
fourth variant times the MUNBa step without ``--cache_latents`` (VAE and text encoder inside the
step) to give the speed-up of caching.

    python eval/bench_step_cost.py --device cpu --json bench_cpu.json
    python eval/bench_step_cost.py --device cuda --json bench_gpu.json  # SD v1.4-sized UNet
    python eval/bench_step_cost.py --device cuda --gradient_checkpointing --json bench_gc.json

``--batch_size`` (per player; default 4, the issue's setting) and ``--methods`` (e.g. leave out
the memory-hungry reference) let the SD v1.4-sized configurations run where memory is short,
even on a CPU.

Every step includes clipping at 1.0 and an Adam step, as in training. The SD losses come from
the training script's own per-step code (``hf_munba.diffusion.unlearner.SDUnlearner``, latents and
prompt embeddings cached as with ``--cache_latents``); the classifier losses those of
``MunbaTrainer`` (cross-entropy, random-label cross-entropy). Peak memory: on CUDA,
``torch.cuda.max_memory_allocated`` around each step; on CPU (``--memory``) the peak resident set
of each method's steps in a fresh process (see ``cpu_peak_rss``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hf_munba.unlearning import get_method, unlearning_step  # noqa: E402

#: sum: one backward of L_r + L_f (the floor); weighted: ``--method weighted`` as users run it (a
#: ConstantWeighting bargainer, one backward per player, unlearning_step); munba: ``--method
#: munba`` (Nash bargaining, the forget rule, unlearning_step); reference: the public code's step
METHODS = ("sum", "weighted", "munba", "reference")
CPU_CONFIGS = ("sd-tiny", "sd-small", "sdxl-tiny", "sd3-tiny", "flux-tiny", "classifier-digits")
#: the model families' tiny pipelines (hf_munba.testing.families), trained on their denoiser
FAMILY_CONFIGS = {"sdxl-tiny": "sdxl", "sd3-tiny": "sd3", "flux-tiny": "flux"}
CUDA_CONFIGS = ("sd14-noxattn", "sd14-lora4")


# ----------------------------------------------------------------------------- workloads

@dataclass
class Workload:
    """Trainable parameters, an optimizer and the two player losses for step ``i``."""

    device: torch.device
    params: List[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    retain_loss: Callable[[int], torch.Tensor]
    forget_loss: Callable[[int], torch.Tensor]
    autocast: torch.dtype | None
    encoded_inputs: bool = False  # SD only: encode pixels and prompts every step (no cache)
    batch_size: int = 0  # per player, set by build()
    model: torch.nn.Module | None = None  # the trained module (UNet or classifier)

    forget_loss_name: str = "remap"  # the front end's forget objective (for the forget rule)

    def __post_init__(self):
        # the registry's methods, as the training loops build them
        munba = get_method("munba")()
        self.bargainer = munba.make_bargainer(self.params)
        self.forget_rule = munba.forget_rule(self.forget_loss_name)
        self.powers = munba.powers()
        self.weighted_bargainer = get_method("weighted")().make_bargainer(self.params)

    @property
    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.params)

    def amp(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)


def _sd14_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8)


def _sd14_vae_and_text_encoder():
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                        latent_channels=4, sample_size=512)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12,
                                        max_position_embeddings=77, hidden_act="quick_gelu",
                                        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    return vae, text, 49408


def _sd_workload(config: str, device: torch.device, autocast, batch: int,
                 gradient_checkpointing: bool) -> Workload:
    """The training script's own per-step code (``SDUnlearner``), with cached latents and prompt
    embeddings (``--cache_latents``) or, with ``work.encoded_inputs``, encoding them every step."""
    from diffusers import DDPMScheduler

    from hf_munba import testing
    from hf_munba.diffusion import params as sd_params
    from hf_munba.diffusion.unlearner import SDUnlearner

    torch.manual_seed(0)
    if config.startswith("sd14"):
        unet, size, ctx_dim = _sd14_unet(), 64, 768
        vae, text_encoder, vocab = _sd14_vae_and_text_encoder()
    else:
        if config == "sd-small":
            unet = testing.tiny_unet(block_out_channels=(64, 128), sample_size=16)
            size, ctx_dim = 16, 32
        else:
            unet, size, ctx_dim = testing.tiny_unet(), 8, 32
        tokenizer = testing.tiny_clip_tokenizer()
        vae, text_encoder, vocab = testing.tiny_vae(), testing.tiny_clip_text_model(tokenizer), len(tokenizer)
    unet.to(device)
    vae.to(device).requires_grad_(False)
    text_encoder.to(device).requires_grad_(False)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    lora = config.endswith("lora4")
    if lora:
        params = sd_params.add_lora_adapter(unet, rank=4, alpha=4, subset="noxattn")
    else:
        params = sd_params.freeze_all_but(unet, sd_params.select_parameter_names(unet, "noxattn"))
    if gradient_checkpointing:
        sd_params.enable_gradient_checkpointing(unet)  # what --gradient_checkpointing calls
    unet.train()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                              beta_start=0.00085, beta_end=0.012)
    gen = torch.Generator().manual_seed(1)
    shape = (batch, 4, size, size)
    cached = {f"{r}_latent_mean": torch.randn(shape, generator=gen).to(device) for r in ("retain", "forget")}
    cached.update({f"{r}_latent_std": 0.1 * torch.ones(shape, device=device) for r in ("retain", "forget")})
    cached.update({f"{r}_embeddings": torch.randn(batch, 77, ctx_dim, generator=gen).to(device)
                   for r in ("retain", "forget", "anchor")})
    pixels = (batch, 3, size * factor, size * factor)
    encoded = {f"{r}_pixel_values": torch.rand(pixels, generator=gen).to(device) * 2 - 1
               for r in ("retain", "forget")}
    encoded.update({f"{r}_input_ids": torch.randint(0, vocab - 2, (batch, 77), generator=gen).to(device)
                    for r in ("retain", "forget", "anchor")})

    unlearner = SDUnlearner(unet, text_encoder, vae, scheduler, forget_objective="remap",
                            target_model="current", lora=lora)
    return _unlearner_workload(unlearner, params, autocast, cached, encoded)


def _unlearner_workload(unlearner, params, autocast, cached, encoded) -> Workload:
    """The two players' losses of ``unlearner`` on the cached batch, or on the encoded one when
    ``work.encoded_inputs`` is set (the benchmark's no-cache variant)."""
    work = Workload(unlearner.device, params, torch.optim.AdamW(params, lr=1e-5), None, None,
                    autocast, model=unlearner.unet)

    def retain(i):
        with work.amp():
            return unlearner.retain_loss(encoded if work.encoded_inputs else cached)

    def forget(i):
        with work.amp():
            return unlearner.forget_loss(encoded if work.encoded_inputs else cached)

    work.retain_loss, work.forget_loss = retain, forget
    return work


def _family_workload(config: str, device: torch.device, autocast, batch: int,
                     gradient_checkpointing: bool) -> Workload:
    """SDXL / SD 3 / Flux in miniature through the same ``SDUnlearner`` and family adapter the
    training script uses (noxattn subset; cached latents and conditioning, or encoded every
    step with ``work.encoded_inputs``)."""
    from hf_munba.diffusion import params as sd_params
    from hf_munba.diffusion.data import embedding_key
    from hf_munba.diffusion.families import family_of_pipeline
    from hf_munba.diffusion.unlearner import SDUnlearner
    from hf_munba.testing.families import TINY_FAMILY_PIPELINES

    torch.manual_seed(0)
    pipe = TINY_FAMILY_PIPELINES[FAMILY_CONFIGS[config]](0)
    family = family_of_pipeline(pipe)
    denoiser = getattr(pipe, family.denoiser).to(device)
    encoders = {s.encoder: getattr(pipe, s.encoder).to(device).requires_grad_(False)
                for s in family.text_encoders}
    tokenizers = {s.tokenizer: getattr(pipe, s.tokenizer) for s in family.text_encoders}
    vae = pipe.vae.to(device).requires_grad_(False)
    params = sd_params.freeze_all_but(denoiser, sd_params.select_parameter_names(
        denoiser, "noxattn", family.denoiser))
    if gradient_checkpointing:
        sd_params.enable_gradient_checkpointing(denoiser)
    denoiser.train()
    gen = torch.Generator().manual_seed(1)
    size = 8  # 16 x 16 pixels
    shape = (batch, vae.config.latent_channels, size, size)
    texts = {"retain": "a person wearing clothes", "forget": "nudity",
             "anchor": "a photo of a person wearing clothes"}
    encoded = {f"{r}_pixel_values": torch.rand(batch, 3, 2 * size, 2 * size, generator=gen)
               .to(device) * 2 - 1 for r in ("retain", "forget")}
    cached = {f"{r}_latent_mean": torch.randn(shape, generator=gen).to(device)
              for r in ("retain", "forget")}
    cached.update({f"{r}_latent_std": 0.1 * torch.ones(shape, device=device)
                   for r in ("retain", "forget")})
    for role, text in texts.items():
        ids = {k: v.to(device) for k, v in family.tokenize(tokenizers, [text] * batch).items()}
        encoded.update({f"{role}_{k}": v for k, v in ids.items()})
        with torch.no_grad():
            cached.update({embedding_key(role, k): v for k, v in family.encode(encoders, ids).items()})
    unlearner = SDUnlearner(denoiser, None, vae, family=family, text_encoders=encoders,
                            forget_objective="remap", target_model="current")
    return _unlearner_workload(unlearner, params, autocast, cached, encoded)


def _classifier_workload(device: torch.device, autocast, batch: int) -> Workload:
    from sklearn.datasets import load_digits

    from hf_munba import testing

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    y = torch.tensor(digits.target)
    forget = y == 0
    xr, yr, xf, yf = x[~forget].to(device), y[~forget].to(device), x[forget].to(device), y[forget].to(device)
    model = testing.tiny_resnet_classifier(num_labels=10).to(device).train()
    params = list(model.parameters())
    work = Workload(device, params, torch.optim.AdamW(params, lr=1e-3), None, None, autocast,
                    model=model, forget_loss_name="random_label")

    def retain(i):
        idx = torch.randint(0, len(xr), (batch,), generator=torch.Generator().manual_seed(i))
        with work.amp():
            logits = model(pixel_values=xr[idx]).logits
        return torch.nn.functional.cross_entropy(logits.float(), yr[idx])

    def forget(i):
        g = torch.Generator().manual_seed(10_000 + i)
        idx = torch.randint(0, len(xf), (batch,), generator=g)
        random_labels = (yf[idx] + torch.randint(1, 10, (batch,), generator=g).to(device)) % 10
        with work.amp():
            logits = model(pixel_values=xf[idx]).logits
        return torch.nn.functional.cross_entropy(logits.float(), random_labels)

    work.retain_loss, work.forget_loss = retain, forget
    return work


def build(config: str, device: str, precision: str, batch_size: int | None = None,
          gradient_checkpointing: bool = False) -> Workload:
    """``batch_size`` defaults to 4 (SD, per player) and 256 (classifier)."""
    dev = torch.device(device)
    autocast = {"fp32": None, "bf16": torch.bfloat16}[precision]
    classifier = config == "classifier-digits"
    batch = batch_size or (256 if classifier else 4)
    if classifier:
        if gradient_checkpointing:  # transformers' ResNet has no checkpointing
            raise ValueError("gradient checkpointing applies to the SD configurations only")
        work = _classifier_workload(dev, autocast, batch)
    elif config in FAMILY_CONFIGS:
        work = _family_workload(config, dev, autocast, batch, gradient_checkpointing)
    else:
        work = _sd_workload(config, dev, autocast, batch, gradient_checkpointing)
    work.batch_size = batch
    return work


# ----------------------------------------------------------------------------- the three steps

def _clip(work: Workload):
    return torch.nn.utils.clip_grad_norm_(work.params, 1.0)


def _finish(work: Workload):
    _clip(work)
    work.optimizer.step()
    work.optimizer.zero_grad(set_to_none=True)


def step_sum(work: Workload, i: int):
    """The floor: autograd sums both players' gradients in one backward pass."""
    (work.retain_loss(i) + work.forget_loss(i)).backward()
    _finish(work)


def _players_then_step(work: Workload, i: int, bargainer, forget_rule=None, powers=None):
    """What the SD loop and MunbaTrainer do per optimizer step: each player's backward inside
    its ``player(i)`` block, then the one shared :func:`unlearning_step` (clip 1.0, Adam)."""
    losses = []
    for k, loss_fn in enumerate((work.retain_loss, work.forget_loss)):
        with bargainer.player(k) as scale:
            loss = loss_fn(i)
            (loss * scale if scale != 1.0 else loss).backward()
        losses.append(loss.detach().float())
    return unlearning_step(bargainer, work.optimizer, losses=torch.stack(losses),
                           clip=lambda: _clip(work), forget_rule=forget_rule, forget_player=1,
                           powers=powers)


def step_weighted(work: Workload, i: int):
    """``--method weighted``: a ConstantWeighting bargainer (the loss scale per player)."""
    _players_then_step(work, i, work.weighted_bargainer)


def step_munba(work: Workload, i: int):
    _players_then_step(work, i, work.bargainer, work.forget_rule, work.powers)


def step_reference(work: Workload, i: int):
    """The public reference implementation's pattern, with the correct weights."""
    lr, lf = work.retain_loss(i), work.forget_loss(i)
    gr = torch.autograd.grad(lr, work.params, retain_graph=True)
    gf = torch.autograd.grad(lf, work.params, retain_graph=True)
    gr_flat = torch.cat([g.reshape(-1) for g in gr])
    gf_flat = torch.cat([g.reshape(-1) for g in gf])
    nr, nf = gr_flat.norm(), gf_flat.norm()
    cos = (gr_flat @ gf_flat) / (nr * nf)
    a_r = 1.0 / (nr * torch.sqrt(1 + cos))
    a_f = 1.0 / (nf * torch.sqrt(1 + cos))
    del gr, gf, gr_flat, gf_flat
    (a_r.detach() * lr + a_f.detach() * lf).backward()  # the third backward pass
    _finish(work)
    if work.device.type == "cuda":
        torch.cuda.empty_cache()


def step_munba_encoding(work: Workload, i: int):
    """MUNBa without ``--cache_latents``: VAE and text encoder run inside every step."""
    work.encoded_inputs = True
    try:
        step_munba(work, i)
    finally:
        work.encoded_inputs = False


STEPS = {"sum": step_sum, "weighted": step_weighted, "munba": step_munba,
         "reference": step_reference,
         "munba_encoding": step_munba_encoding}


# ----------------------------------------------------------------------------- measurement

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(work: Workload, steps: int, warmup: int, methods=METHODS):
    """Median seconds and peak bytes per method, interleaved (rotating order) against drift."""
    times = {m: [] for m in methods}
    peaks = {m: 0 for m in methods}
    k = len(methods)
    for i in range(warmup + steps):
        order = methods[i % k:] + methods[: i % k]
        for m in order:
            _sync(work.device)
            if work.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            STEPS[m](work, i)
            _sync(work.device)
            if i >= warmup:
                times[m].append(time.perf_counter() - t0)
                if work.device.type == "cuda":
                    peaks[m] = max(peaks[m], torch.cuda.max_memory_allocated())
    return {m: statistics.median(t) for m, t in times.items()}, peaks


def cpu_peak_rss(config: str, precision: str, method: str, steps: int, batch_size: int | None,
                 gradient_checkpointing: bool) -> int:
    """Peak resident bytes of a fresh process over ``steps`` steps of one method.

    Building a model can take more memory than a step does, so the child runs one step (the
    optimizer state then exists, as in training), resets the kernel's high-water mark
    (``/proc/self/clear_refs``) and reads ``VmHWM`` after the measured steps. Allocations from
    128 KiB up are forced onto ``mmap`` so that freed tensors leave the resident set at once, as
    they leave ``torch.cuda.memory_allocated``; without this glibc keeps them and every method
    shows the same peak. Where the reset is unavailable, the whole process's peak is reported.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run(
        [sys.executable, __file__, "--_child", config, precision, method, str(steps),
         str(batch_size or 0), str(int(gradient_checkpointing))],
        capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.strip().splitlines()[-1])


def _high_water_kib() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _child(config, precision, method, steps, batch_size, gradient_checkpointing):
    work = build(config, "cpu", precision, int(batch_size) or None, bool(int(gradient_checkpointing)))
    STEPS[method](work, 0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # high-water mark := current resident set
    except OSError:
        pass
    for i in range(1, int(steps) + 1):
        STEPS[method](work, i)
    print(_high_water_kib() * 1024)


def _ratio(values, a, b):
    """values[a] / values[b], or None where either was not measured."""
    return values[a] / values[b] if values.get(a) and values.get(b) else None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_child"]:
        return _child(*argv[1:7])
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--configs", nargs="*", default=None,
                   help=f"configurations (default: {CPU_CONFIGS} on cpu, {CUDA_CONFIGS} on cuda)")
    p.add_argument("--precisions", nargs="*", choices=["fp32", "bf16"], default=None,
                   help="default: fp32 on cpu; bf16 and fp32 on cuda")
    p.add_argument("--steps", type=int, default=10, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=None,
                   help="per player; default 4 for SD (the issue's setting), 256 for the classifier")
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="checkpoint the UNet's activations, as the SD script's flag does")
    p.add_argument("--memory", action="store_true",
                   help="on cpu, also measure the peak RSS of each method's steps in a fresh process")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   help="steps to time (default: all; the reference needs the most memory)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but torch sees no CUDA device")
    configs = args.configs or list(CPU_CONFIGS if args.device == "cpu" else CUDA_CONFIGS)
    known = CPU_CONFIGS + CUDA_CONFIGS
    if any(c not in known for c in configs):
        p.error(f"unknown configuration in {configs}; known: {list(known)}")
    if args.batch_size is not None and args.batch_size < 1:
        p.error(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.gradient_checkpointing and "classifier-digits" in configs:
        p.error("--gradient_checkpointing applies to the SD configurations only "
                "(transformers' ResNet has no checkpointing)")
    precisions = args.precisions or (["bf16", "fp32"] if args.device == "cuda" else ["fp32"])

    rows = []
    for config in configs:
        for precision in precisions:
            work = build(config, args.device, precision, args.batch_size,
                         args.gradient_checkpointing)
            sd = config != "classifier-digits"
            methods = tuple(m for m in METHODS if m in args.methods)
            timed = methods + (("munba_encoding",) if sd and "munba" in methods else ())
            t, peak = time_steps(work, args.steps, args.warmup, timed)
            n_params, batch = work.num_trainable, work.batch_size
            # The loss closures and the workload reference each other: without a collection
            # this configuration's model, gradients and optimizer state would stay allocated
            # and inflate the next configuration's peak memory (and the CPU children's RSS).
            del work
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
            elif args.memory:
                peak = {m: cpu_peak_rss(config, precision, m, 2, args.batch_size,
                                        args.gradient_checkpointing) for m in methods}
            rows.append({
                "config": config, "precision": precision, "batch_size": batch,
                "trainable_params": n_params,
                "ms": {m: 1000 * t[m] for m in methods}, "peak_bytes": peak,
                "munba_vs_sum_time": _ratio(t, "munba", "sum"),
                "weighted_vs_sum_time": _ratio(t, "weighted", "sum"),
                "munba_vs_weighted_time": _ratio(t, "munba", "weighted"),
                "reference_vs_munba_time": _ratio(t, "reference", "munba"),
                "munba_vs_sum_memory": _ratio(peak, "munba", "sum"),
                "munba_vs_weighted_memory": _ratio(peak, "munba", "weighted"),
                "reference_vs_weighted_memory": _ratio(peak, "reference", "weighted"),
                "cache_latents_speedup": _ratio(t, "munba_encoding", "munba"),
            })

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": (torch.cuda.get_device_name() if args.device == "cuda"
                   else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"),
        "torch": torch.__version__, "python": platform.python_version(),
        "steps": args.steps, "warmup": args.warmup, "batch_size": args.batch_size,
        "gradient_checkpointing": args.gradient_checkpointing,
    }
    import diffusers
    meta["diffusers"] = diffusers.__version__

    fmt = lambda x: f"{x:.3f}x" if x else "n/a"  # noqa: E731
    ms = lambda r, m: f"{r['ms'][m]:.1f}" if m in r["ms"] else "n/a"  # noqa: E731
    print("| config | precision | trainable | sum ms | weighted ms | munba ms | reference ms | "
          "munba/sum time | weighted/sum time | munba/weighted time | reference/munba time | "
          "munba/weighted peak mem | reference/weighted peak mem | --cache_latents speed-up |")
    print("|---" * 14 + "|")
    for r in rows:
        print(f"| {r['config']} (batch {r['batch_size']}) | {r['precision']} | {r['trainable_params'] / 1e6:.2f}M | "
              f"{ms(r, 'sum')} | {ms(r, 'weighted')} | {ms(r, 'munba')} | {ms(r, 'reference')} | "
              f"{fmt(r['munba_vs_sum_time'])} | {fmt(r['weighted_vs_sum_time'])} | "
              f"{fmt(r['munba_vs_weighted_time'])} | {fmt(r['reference_vs_munba_time'])} | "
              f"{fmt(r['munba_vs_weighted_memory'])} | {fmt(r['reference_vs_weighted_memory'])} | "
              f"{fmt(r['cache_latents_speedup'])} |")
    print(f"\n{meta['date']}, {meta['device']}, torch {meta['torch']}, diffusers "
          f"{meta['diffusers']}; median of {args.steps} interleaved steps after {args.warmup} warm-up")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
