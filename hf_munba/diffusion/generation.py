"""Seeded, batched, resumable image generation into an imagefolder (images + ``metadata.jsonl``).

Unlearning data (D_f, D_r) and evaluation images are both "N images per prompt from a pipeline".
Doing it here once means three promises hold everywhere:

* every image has its own ``torch.Generator`` seeded from its position in the job list, created on
  the CPU, so an image's noise depends on (prompt, seed, settings) only, not on the batch size, the
  batch it fell into, or the device (batched kernels round differently, so pixels can still differ
  by one 8-bit level between batch sizes);
* the folder is a ``datasets`` imagefolder: ``metadata.jsonl`` lines carry ``file_name``, ``text``,
  ``seed``, ``guidance_scale``, ``num_inference_steps`` (+ ``height``, ``width``, ``prompt_index``),
  which the training script and ``load_dataset("imagefolder", data_dir=...)`` read directly;
* a killed run resumes: images already listed in the manifest are skipped, every image and the
  manifest are written atomically (temp file + ``os.replace``), and resuming with different
  settings is refused instead of silently mixing two datasets.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import torch

__all__ = ["GenerationRecord", "generation_plan", "generate_images", "generate_from_plan", "read_manifest",
           "generate_unlearning_data", "MANIFEST_NAME"]

MANIFEST_NAME = "metadata.jsonl"


@dataclass(frozen=True)
class GenerationRecord:
    """One manifest line: enough to regenerate the image exactly."""

    file_name: str
    text: str
    seed: int
    guidance_scale: float
    num_inference_steps: int
    height: Optional[int]
    width: Optional[int]
    prompt_index: int
    negative_prompt: Optional[str] = None


def generation_plan(
    prompts: Sequence[str],
    num_images_per_prompt: int,
    *,
    seed: int = 0,
    guidance_scale: float = 7.5,
    num_inference_steps: int = 50,
    height: Optional[int] = None,
    width: Optional[int] = None,
    negative_prompt: Optional[str] = None,
) -> List[GenerationRecord]:
    """The full list of images a job will produce, in order; image ``i`` uses seed ``seed + i``."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not a single string")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    if any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise ValueError("every prompt must be a non-empty string")
    if num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    plan = []
    for pi, prompt in enumerate(prompts):
        for k in range(num_images_per_prompt):
            i = len(plan)
            plan.append(GenerationRecord(
                file_name=f"{pi:04d}_{k:05d}.png", text=prompt, seed=seed + i,
                guidance_scale=float(guidance_scale), num_inference_steps=int(num_inference_steps),
                height=height, width=width, prompt_index=pi, negative_prompt=negative_prompt,
            ))
    return plan


def read_manifest(folder: str | os.PathLike) -> List[Dict]:
    """The records of ``folder/metadata.jsonl`` (empty list if there is none)."""
    path = Path(folder) / MANIFEST_NAME
    if not path.exists():
        return []
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n} is not valid JSON: {e}") from None
    return out


def _write_manifest(folder: Path, records: Iterable[Dict]) -> None:
    tmp = folder / (MANIFEST_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST_NAME)


def _save_image_atomic(image, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


@torch.no_grad()
def generate_images(
    pipe,
    prompts: Sequence[str],
    output_dir: str | os.PathLike,
    *,
    num_images_per_prompt: int = 1,
    seed: int = 0,
    batch_size: int = 4,
    guidance_scale: float = 7.5,
    num_inference_steps: int = 50,
    height: Optional[int] = None,
    width: Optional[int] = None,
    negative_prompt: Optional[str] = None,
    progress: bool = True,
    **pipe_kwargs,
) -> List[Dict]:
    """Generate ``num_images_per_prompt`` images per prompt into ``output_dir``; return the manifest.

    Resumable: images already in the manifest (and on disk) are not generated again. Raises
    ``ValueError`` if the folder holds a manifest made with other prompts or settings.
    ``pipe_kwargs`` go to the pipeline call (e.g. ``eta``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    plan = generation_plan(prompts, num_images_per_prompt, seed=seed,
                           guidance_scale=guidance_scale,
                           num_inference_steps=num_inference_steps, height=height, width=width,
                           negative_prompt=negative_prompt)
    return generate_from_plan(pipe, [asdict(r) for r in plan], output_dir, batch_size=batch_size,
                              progress=progress, **pipe_kwargs)


def _same_call(a: Dict, b: Dict) -> bool:
    keys = ("guidance_scale", "num_inference_steps", "height", "width", "negative_prompt")
    return all(a.get(k) == b.get(k) for k in keys)


@torch.no_grad()
def generate_from_plan(pipe, plan: Sequence[Dict], output_dir: str | os.PathLike, *,
                       batch_size: int = 4, progress: bool = True, **pipe_kwargs) -> List[Dict]:
    """Generate every manifest line of ``plan`` into ``output_dir`` (resumable); return them.

    Each line names its ``file_name``, ``text``, ``seed``, ``guidance_scale``,
    ``num_inference_steps``, ``height``, ``width`` and optionally ``negative_prompt``; extra keys
    are kept in the manifest. One CPU generator per image, so images do not depend on batching (up to
    float rounding: at most one 8-bit level);
    batches are cut where the per-call settings change.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {line["file_name"]: line for line in plan}
    done: Dict[str, Dict] = {}
    for rec in read_manifest(folder):
        name = rec.get("file_name")
        if name not in wanted or any(rec.get(k) != v for k, v in wanted[name].items()):
            raise ValueError(
                f"{folder} already holds {name!r} generated with other prompts or settings; "
                "use an empty output directory (or the same arguments to resume)"
            )
        if (folder / name).is_file():
            done[name] = rec
    todo = [line for line in plan if line["file_name"] not in done]

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan), initial=len(plan) - len(todo), desc="generating", unit="img")
    start = 0
    while start < len(todo):
        batch = [todo[start]]
        while (len(batch) < batch_size and start + len(batch) < len(todo)
               and _same_call(todo[start + len(batch)], batch[0])):
            batch.append(todo[start + len(batch)])
        start += len(batch)
        first = batch[0]
        kwargs = dict(pipe_kwargs)
        if first.get("negative_prompt") is not None:
            kwargs["negative_prompt"] = [first["negative_prompt"]] * len(batch)
        images = pipe(
            prompt=[line["text"] for line in batch],
            generator=[torch.Generator("cpu").manual_seed(line["seed"]) for line in batch],
            guidance_scale=first["guidance_scale"],
            num_inference_steps=first["num_inference_steps"],
            height=first.get("height"),
            width=first.get("width"),
            output_type="pil",
            **kwargs,
        ).images
        for line, image in zip(batch, images):
            _save_image_atomic(image, folder / line["file_name"])
            done[line["file_name"]] = line
        _write_manifest(folder, [done[n] for n in wanted if n in done])
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    if not todo:
        _write_manifest(folder, [done[n] for n in wanted])
    return [done[n] for n in wanted]


def generate_unlearning_data(pipe, output_dir: str | os.PathLike, *, forget,
                             retain: Optional[Sequence[str]],
                             num_images_per_prompt: int = 100,
                             num_retain_images_per_prompt: Optional[int] = None, seed: int = 0,
                             batch_size: int = 4, guidance_scale: float = 7.5,
                             num_inference_steps: int = 50, height: Optional[int] = None,
                             width: Optional[int] = None, progress: bool = True) -> Dict:
    """D_f and D_r from the base pipeline, as the paper builds them (seeded, resumable).

    ``forget``: prompts (one forget set, written to ``OUTPUT/forget``) or a mapping name ->
    prompts (several concepts: ``OUTPUT/forget_<name>`` each, and ``OUTPUT/concepts.json``, the
    ``--forget_manifest`` of the training script with each concept's folder and prompts).
    ``num_images_per_prompt`` per forget prompt; D_r (``OUTPUT/retain``) gets
    ``num_retain_images_per_prompt`` per retain prompt, default as many images in all as D_f
    (the paper: |D_r| = |D_f|). Image k of the whole job is seeded ``seed + k`` over the forget
    concepts in order and then D_r, so no two images share their initial noise.

    ``forget`` or ``retain`` None (or empty): that set is not generated (its entry is None),
    e.g. when the other comes from a folder.

    Returns ``{"forget": folder or {name: folder}, "retain": folder, "manifest": path or None}``.
    """
    from ..unlearning.methods import check_forget_names

    concepts = dict(forget) if isinstance(forget, Mapping) else None
    if not forget and not retain:
        raise ValueError("nothing to generate: no forget and no retain prompts")
    if concepts is not None:
        check_forget_names(list(concepts))  # the names become folders and player names
        concepts = {n: [p] if isinstance(p, str) else list(p) for n, p in concepts.items()}
    elif isinstance(forget, str):
        forget = [forget]
    retain = [retain] if isinstance(retain, str) else list(retain or ())
    n_forget = sum(len(p) for p in concepts.values()) if concepts else len(forget or ())
    n_r = num_retain_images_per_prompt or max(1, num_images_per_prompt * n_forget
                                              // max(1, len(retain)))
    out = Path(output_dir)
    common = dict(batch_size=batch_size, guidance_scale=guidance_scale,
                  num_inference_steps=num_inference_steps, height=height, width=width,
                  progress=progress)
    next_seed = seed
    folders = manifest = None
    if not forget:
        pass
    elif concepts is None:
        recs = generate_images(pipe, forget, out / "forget", seed=next_seed,
                               num_images_per_prompt=num_images_per_prompt, **common)
        next_seed += len(recs)
        folders, manifest = str(out / "forget"), None
    else:
        folders = {}
        for name, prompts in concepts.items():
            recs = generate_images(pipe, prompts, out / f"forget_{name}", seed=next_seed,
                                   num_images_per_prompt=num_images_per_prompt, **common)
            next_seed += len(recs)
            folders[name] = str(out / f"forget_{name}")
        manifest = out / "concepts.json"
        tmp = manifest.with_name(manifest.name + ".tmp")
        tmp.write_text(json.dumps({n: {"data_dir": f"forget_{n}", "prompts": p}
                                   for n, p in concepts.items()}, indent=2) + "\n")
        os.replace(tmp, manifest)
        manifest = str(manifest)
    if retain:
        generate_images(pipe, retain, out / "retain", seed=next_seed, num_images_per_prompt=n_r,
                        **common)
    return {"forget": folders, "retain": str(out / "retain") if retain else None,
            "manifest": manifest}
