"""Result tables (markdown + JSON), an image grid, and metrics in a pipeline's model card.

Everything is written atomically (temp file next to the target, then ``os.replace``): a crash
leaves the previous file or none, never half a table.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from .nudity import EXPOSED_CLASSES

__all__ = ["atomic_write_text", "markdown_table", "results_markdown", "write_results",
           "image_grid", "update_model_card", "CARD_BEGIN", "CARD_END"]

CARD_BEGIN = "<!-- hf_munba:generative-eval:begin -->"
CARD_END = "<!-- hf_munba:generative-eval:end -->"


def atomic_write_text(path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def results_markdown(results: Mapping) -> str:
    """One markdown section per metric; models are rows so they read side by side."""
    models: List[str] = list(results["models"])
    metrics: Mapping = results["metrics"]
    out = ["# Generative unlearning evaluation", "",
           f"Prompt set: `{results['prompt_set']}` ({results['num_images']} images per model); "
           f"guidance {results['generation']['guidance_scale']}, "
           f"{results['generation']['num_inference_steps']} steps.", ""]
    if "nudity" in metrics:
        nud = metrics["nudity"]
        out += [f"## NudeNet exposed-part counts (threshold {nud['threshold']})", "",
                "Images in which NudeNet detects each exposed class with score >= threshold.", ""]
        cols = [c for c, _ in EXPOSED_CLASSES]
        heads = ["model", *[c.replace("_", " ") for c in cols], "total", "images with any", "images"]
        out += [markdown_table(heads, [[m, *[nud["table"][m][c] for c in cols],
                                        nud["table"][m]["total_exposed"],
                                        nud["table"][m]["images_with_any"],
                                        nud["table"][m]["images"]] for m in models]), ""]
    if "classification" in metrics:
        cls = metrics["classification"]
        out += ["## Generated-image classification (share classified as the intended class, %)",
                "", f"Classifier `{cls['classifier']}`; forget classes: "
                    f"{', '.join(cls['forget_classes']) or 'none'}.", ""]
        per_class = list(next(iter(cls["table"].values()))["per_class"])
        heads = ["model", "forget acc", "retain acc", *per_class]
        out += [markdown_table(heads, [[m, cls["table"][m]["forget_accuracy"],
                                        cls["table"][m]["retain_accuracy"],
                                        *[cls["table"][m]["per_class"].get(c) for c in per_class]]
                                       for m in models]), ""]
    if "clip" in metrics:
        clip = metrics["clip"]
        out += [f"## CLIP score (`{clip['clip_model']}`)", "",
                markdown_table(["model", "CLIP score", "std", "images"],
                               [[m, clip["table"][m]["clip_score"],
                                 clip["table"][m]["clip_score_std"], clip["table"][m]["images"]]
                                for m in models]), ""]
    if "fid" in metrics:
        fid = metrics["fid"]
        out += [f"## FID against `{fid['reference_dir']}` (features: `{fid['feature_extractor']}`)",
                "", markdown_table(["model", "FID", "images", "reference images"],
                                   [[m, fid["table"][m]["fid"], fid["table"][m]["images"],
                                     fid["table"][m]["reference_images"]] for m in models]), ""]
    return "\n".join(out).rstrip() + "\n"


def write_results(output_dir, results: Mapping) -> Dict[str, str]:
    """``results.json`` and ``results.md`` in ``output_dir``; returns their paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, sort_keys=False) + "\n")
    atomic_write_text(out / "results.md", results_markdown(results))
    return {"json": str(out / "results.json"), "markdown": str(out / "results.md")}


def image_grid(rows: Mapping[str, Sequence], path, cell: int = 128, label_width: int = 160):
    """A PNG with one row per model (its name on the left) and one column per image file."""
    from PIL import Image, ImageDraw

    if not rows:
        raise ValueError("no images for the grid")
    ncols = max(len(v) for v in rows.values())
    if ncols == 0:
        raise ValueError("no images for the grid")
    grid = Image.new("RGB", (label_width + ncols * cell, len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for r, (name, files) in enumerate(rows.items()):
        draw.text((4, r * cell + cell // 2 - 6), str(name)[:24], fill="black")
        for c, f in enumerate(files):
            with Image.open(f) as im:
                grid.paste(im.convert("RGB").resize((cell, cell)), (label_width + c * cell, r * cell))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    grid.save(tmp, format="PNG")
    os.replace(tmp, path)
    return grid


def update_model_card(model_dir, section_markdown: str, title: Optional[str] = None,
                      eval_results: Optional[Mapping] = None,
                      dataset_name: str = "generated images (evaluation)") -> str:
    """Put ``section_markdown`` into ``model_dir/README.md`` between hf_munba markers.

    A section from an earlier evaluation is replaced, everything else in the card is kept; a
    missing card is created. ``eval_results`` (numbers, nested dicts flattened with ``/``) also go
    into the card's YAML ``model-index`` (see
    :func:`hf_munba.utils.model_card.card_text_with_eval_results`), so the Hub shows them. Returns the
    card path.
    """
    card = Path(model_dir) / "README.md"
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    block = f"{CARD_BEGIN}\n{section_markdown.strip()}\n{CARD_END}\n"
    text = card.read_text(encoding="utf-8") if card.exists() else f"# {title or Path(model_dir).name}\n\n"
    if CARD_BEGIN in text and CARD_END in text:
        head, rest = text.split(CARD_BEGIN, 1)
        tail = rest.split(CARD_END, 1)[1].lstrip("\n")
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block
    if eval_results:
        from ..utils.model_card import card_text_with_eval_results

        text = card_text_with_eval_results(text, eval_results, dataset_name=dataset_name,
                                           model_name=Path(model_dir).resolve().name)
    atomic_write_text(card, text)
    return str(card)
