"""The generative evaluation's markdown document, and its metrics in a pipeline's model card.

The writer (``results.json`` + ``results.md``), the table helper and the image grid are shared
by every evaluation and live in :mod:`.results` and :mod:`.grid`; they are importable from here
too, as before. Everything is written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Optional

from .grid import image_grid
from .nudity import EXPOSED_CLASSES
from .results import atomic_write_text, deprecated_alias, markdown_table
from .results import write_results as _write_results

__all__ = ["atomic_write_text", "markdown_table", "generation_markdown",
           "image_grid", "update_model_card", "CARD_BEGIN", "CARD_END",
           "results_markdown", "write_results"]

CARD_BEGIN = "<!-- hf_munba:generative-eval:begin -->"
CARD_END = "<!-- hf_munba:generative-eval:end -->"


def generation_markdown(results: Mapping) -> str:
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


def _write_generation_results(output_dir, results: Mapping) -> Dict[str, str]:
    return _write_results(output_dir, results, markdown=generation_markdown)


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


# one release: the names these had before the one writer
results_markdown = deprecated_alias(generation_markdown, "hf_munba.evaluation.report.results_markdown",
                                    "hf_munba.evaluation.report.generation_markdown")
write_results = deprecated_alias(_write_generation_results, "hf_munba.evaluation.report.write_results",
                                 "hf_munba.evaluation.results.write_results(output_dir, results, "
                                 "markdown=generation_markdown)")
