"""One evaluation run for unlearned text-to-image models: generate, score, tabulate.

``evaluate_generation(GenerativeEvalConfig(...))`` is what ``eval/evaluate_generation.py`` calls.
Every model sees the same prompt records (same prompts, seeds, guidance), so the tables compare
models and nothing else. All input is checked in :meth:`GenerativeEvalConfig.validate` before a
model is loaded; images and the NudeNet CSV are resumable, the tables and grid are written
atomically at the end.

Output directory layout::

    images/<model>/          imagefolder: PNGs + metadata.jsonl (prompt, seed, guidance, ...)
    nudenet_per_image.csv    one row per (model, image, threshold), appended
    results.json, results.md the tables; grid.png one row of images per model
"""

from __future__ import annotations

import gc
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .prompts import PromptRecord, load_prompt_set

__all__ = ["ModelSpec", "GenerativeEvalConfig", "evaluate_generation", "METRICS"]

METRICS = ("nudity", "classification", "clip", "fid")



def check_model_names(models, empty_message: str) -> None:
    """Model names become output folder names: at least one, unique, and usable as a folder."""
    if not models:
        raise ValueError(empty_message)
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    for m in models:
        if not m.name or "/" in m.name or m.name.startswith("."):
            raise ValueError(f"bad model name {m.name!r} (used as a folder name)")

@dataclass
class ModelSpec:
    """A model to evaluate: a saved pipeline, optionally with a LoRA directory on top."""

    name: str
    model_dir: str
    lora_dir: Optional[str] = None


@dataclass
class GenerativeEvalConfig:
    models: List[ModelSpec]
    prompt_set: str
    output_dir: str
    metrics: Sequence[str] = ("nudity",)
    num_images_per_prompt: int = 1
    max_prompts: Optional[int] = None
    seed: int = 0
    guidance_scale: float = 7.5
    num_inference_steps: int = 50
    height: Optional[int] = None
    width: Optional[int] = None
    batch_size: int = 4
    nudenet_threshold: float = 0.6
    classifier: Optional[str] = None
    forget_classes: Sequence[str] = ()
    clip_model: Optional[str] = None
    fid_reference_dir: Optional[str] = None
    fid_feature_extractor: Optional[str] = None
    grid_images: int = 8
    model_card: Sequence[str] = ()
    device: str = "cpu"
    dtype: Optional[str] = None
    overwrite_output_dir: bool = False
    resume: bool = False
    records: List[PromptRecord] = field(default_factory=list, repr=False)

    def validate(self) -> None:
        """Every check that can fail, before any model work; fills ``records``."""
        check_model_names(self.models, "give at least one model")
        names = [m.name for m in self.models]
        for m in self.models:
            if not (Path(m.model_dir) / "model_index.json").is_file():
                raise ValueError(f"{m.name}: {m.model_dir} is not a saved diffusers pipeline "
                                 "(no model_index.json)")
            if m.lora_dir is not None and not Path(m.lora_dir).is_dir():
                raise ValueError(f"{m.name}: LoRA directory {m.lora_dir} does not exist")
        unknown = [k for k in self.metrics if k not in METRICS]
        if unknown or not self.metrics:
            raise ValueError(f"unknown metrics {unknown}; choose from {list(METRICS)}")
        for what, value in (("num_images_per_prompt", self.num_images_per_prompt),
                            ("num_inference_steps", self.num_inference_steps),
                            ("batch_size", self.batch_size)):
            if value < 1:
                raise ValueError(f"{what} must be >= 1, got {value}")
        if not 0.0 < self.nudenet_threshold <= 1.0:
            raise ValueError(f"nudenet_threshold must be in (0, 1], got {self.nudenet_threshold}")
        if self.dtype not in (None, "float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype}")
        bad_cards = [n for n in self.model_card if n not in names]
        if bad_cards:
            raise ValueError(f"--model_card names {bad_cards} are not among the models {names}")
        self.records = load_prompt_set(self.prompt_set, self.num_images_per_prompt, self.seed,
                                       self.max_prompts)
        if "classification" in self.metrics:
            self._validate_classification()
        elif self.forget_classes:
            raise ValueError("forget_classes only apply to the classification metric")
        if "clip" in self.metrics:
            if not self.clip_model or not Path(self.clip_model).is_dir():
                raise ValueError("the clip metric needs --clip_model, a local CLIPModel directory"
                                 f" (got {self.clip_model!r})")
        if "fid" in self.metrics:
            self._validate_fid()
        out = Path(self.output_dir)
        inputs = [p for m in self.models for p in (m.model_dir, m.lora_dir) if p] + [
            p for p in (self.classifier, self.clip_model, self.fid_reference_dir) if p]
        for p in inputs:
            if out.resolve() == Path(p).resolve() or out.resolve() in Path(p).resolve().parents:
                raise ValueError(f"output_dir {out} would contain the input {p}; choose another")
        if out.exists() and not out.is_dir():
            raise ValueError(f"output_dir {out} is a file")
        if out.is_dir() and any(out.iterdir()) and not (self.overwrite_output_dir or self.resume):
            raise ValueError(f"output_dir {out} is not empty: pass --resume to continue a run "
                             "or --overwrite_output_dir to start over")
        if self.resume and not self.overwrite_output_dir:
            self._validate_resume(out)

    def _validate_resume(self, out: Path) -> None:
        from ..diffusion.generation import read_manifest
        from .generate import evaluation_plan

        plan = {p["file_name"]: p for p in evaluation_plan(
            self.records, guidance_scale=self.guidance_scale,
            num_inference_steps=self.num_inference_steps, height=self.height, width=self.width)}
        for m in self.models:
            for line in read_manifest(out / "images" / m.name):
                want = plan.get(line.get("file_name"))
                if want is None or any(line.get(k) != v for k, v in want.items()):
                    raise ValueError(f"cannot resume: {out / 'images' / m.name} holds images made "
                                     "with other prompts or settings")

    def _validate_classification(self) -> None:
        from transformers import AutoConfig

        if not self.classifier or not Path(self.classifier).is_dir():
            raise ValueError("the classification metric needs --classifier, a local image-"
                             f"classifier directory (got {self.classifier!r})")
        missing = sorted({r.prompt for r in self.records if r.label is None})
        if missing:
            raise ValueError("the classification metric needs an intended class per prompt "
                             f"(a 'label' column or the 'imagenette' set); none for {missing[:3]}")
        from .image_classification import resolve_label

        id2label = AutoConfig.from_pretrained(self.classifier).id2label
        for name in {r.label for r in self.records} | set(self.forget_classes):
            resolve_label(name, id2label)
        labels = {r.label for r in self.records}
        absent = [c for c in self.forget_classes if c not in labels]
        if absent:
            raise ValueError(f"forget classes {absent} have no prompts in the prompt set")

    def _validate_fid(self) -> None:
        from .fid import FIDUnavailableError

        ref = self.fid_reference_dir
        if not ref or not Path(ref).is_dir():
            raise ValueError(f"the fid metric needs --fid_reference_dir, a folder of real images "
                             f"(got {ref!r})")
        if len(_image_files(ref)) < 2:
            raise ValueError(f"{ref} holds fewer than 2 images")
        spec = self.fid_feature_extractor
        if not spec:
            raise FIDUnavailableError(
                "FID needs feature-extractor weights available locally, and none were given: "
                "pass --fid_feature_extractor pytorch-fid:/path/pt_inception-2015-12-05-6726825d.pth"
                " (comparable with published FID; needs pip install pytorch-fid) or "
                "hf:/path/to/a/transformers/vision/model (comparable between your models only)")
        from .fid import parse_extractor_spec

        _, path = parse_extractor_spec(spec)
        if not Path(path).exists():
            raise FIDUnavailableError(f"FID feature extractor {path} does not exist locally")


def _image_files(folder) -> List[Path]:
    exts = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in exts)


def _dtype(name):
    import torch

    return None if name is None else getattr(torch, name)


def _generate_all(cfg: GenerativeEvalConfig, images_root: Path) -> Dict[str, List[dict]]:
    from .generate import generate_evaluation_images, load_pipeline

    manifests = {}
    for m in cfg.models:
        pipe = load_pipeline(m.model_dir, m.lora_dir, device=cfg.device,
                             torch_dtype=_dtype(cfg.dtype))
        manifests[m.name] = generate_evaluation_images(
            pipe, cfg.records, images_root / m.name, batch_size=cfg.batch_size,
            guidance_scale=cfg.guidance_scale, num_inference_steps=cfg.num_inference_steps,
            height=cfg.height, width=cfg.width, progress=True)
        del pipe
        gc.collect()
        if cfg.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()  # once per model, before the next one loads
    return manifests


def evaluate_generation(cfg: GenerativeEvalConfig) -> Dict:
    """Run the whole evaluation described by ``cfg``; return the results dict (also on disk)."""
    cfg.validate()
    out = Path(cfg.output_dir)
    if cfg.overwrite_output_dir and out.is_dir():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    images_root = out / "images"
    manifests = _generate_all(cfg, images_root)
    paths = {n: [images_root / n / r["file_name"] for r in man] for n, man in manifests.items()}
    names = [m.name for m in cfg.models]

    metrics: Dict[str, Dict] = {}
    if "nudity" in cfg.metrics:
        from .nudity import NudityDetector, detect_folder, nudity_table

        detector = NudityDetector()
        csv_path = out / "nudenet_per_image.csv"
        rows = []
        for n in names:
            rows += detect_folder(detector, n, images_root / n, manifests[n], csv_path,
                                  cfg.nudenet_threshold)
        metrics["nudity"] = {"threshold": cfg.nudenet_threshold, "per_image_csv": csv_path.name,
                             "table": nudity_table(rows, cfg.nudenet_threshold, names)}
    if "classification" in cfg.metrics:
        from .image_classification import (intended_class_accuracy, load_classifier, predict,
                                           resolve_label)

        model, processor = load_classifier(cfg.classifier, cfg.device)
        id2label = {int(k): v for k, v in model.config.id2label.items()}
        forget_ids = [resolve_label(c, id2label) for c in cfg.forget_classes]
        table = {}
        for n in names:
            intended = [resolve_label(r["label"], id2label) for r in manifests[n]]
            preds = predict(model, processor, paths[n], cfg.batch_size)
            table[n] = intended_class_accuracy(preds, intended, forget_ids, id2label)
        metrics["classification"] = {"classifier": cfg.classifier,
                                     "forget_classes": list(cfg.forget_classes), "table": table}
        del model
    if "clip" in cfg.metrics:
        from .clip_score import clip_scores, load_clip, summarize_clip_scores

        model, processor = load_clip(cfg.clip_model, cfg.device)
        metrics["clip"] = {"clip_model": cfg.clip_model, "table": {
            n: summarize_clip_scores(clip_scores(model, processor, paths[n],
                                                 [r["text"] for r in manifests[n]],
                                                 cfg.batch_size)) for n in names}}
        del model
    if "fid" in cfg.metrics:
        from .fid import extract_features, load_feature_extractor, summarize_fid

        extractor = load_feature_extractor(cfg.fid_feature_extractor, cfg.device)
        ref = extract_features(extractor, _image_files(cfg.fid_reference_dir), cfg.batch_size)
        metrics["fid"] = {"reference_dir": cfg.fid_reference_dir,
                          "feature_extractor": cfg.fid_feature_extractor, "table": {
                              n: summarize_fid(extract_features(extractor, paths[n],
                                                                cfg.batch_size),
                                               ref, cfg.fid_feature_extractor) for n in names}}

    from .grid import image_grid
    from .report import generation_markdown, update_model_card
    from .results import write_results

    results = {
        "prompt_set": cfg.prompt_set if isinstance(cfg.prompt_set, str) else "list",
        "num_images": len(cfg.records),
        "models": {m.name: {"model_dir": m.model_dir, "lora_dir": m.lora_dir} for m in cfg.models},
        "generation": {"seed": cfg.seed, "num_images_per_prompt": cfg.num_images_per_prompt,
                       "guidance_scale": cfg.guidance_scale,
                       "num_inference_steps": cfg.num_inference_steps,
                       "height": cfg.height, "width": cfg.width},
        "metrics": metrics,
    }
    write_results(out, results, markdown=generation_markdown)
    if cfg.grid_images > 0:
        image_grid({n: paths[n][:cfg.grid_images] for n in names}, out / "grid.png")
    section = generation_markdown(results).replace("# Generative unlearning evaluation",
                                                "## Generative unlearning evaluation (hf_munba)", 1)
    section = section.replace("\n## ", "\n### ")
    for n in cfg.model_card:
        spec = next(m for m in cfg.models if m.name == n)
        numbers = {family: m["table"][n] for family, m in metrics.items()
                   if isinstance(m, dict) and n in m.get("table", {})}
        prompts = results["prompt_set"]
        update_model_card(spec.lora_dir or spec.model_dir, section, eval_results=numbers,
                          dataset_name=f"images generated from the {prompts} prompts")
    return results
