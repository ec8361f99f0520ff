"""Share of generated images a classifier assigns to the class the prompt asked for.

The paper's Imagenette protocol: generate "an image of a {class}" for every class, classify the
images with a fixed classifier, and report the share classified as the intended class, separately
for the forgotten classes (should drop) and the retained ones (should stay). The classifier is
any ``AutoModelForImageClassification`` directory; intended classes are matched against its
``id2label`` names, including ImageNet-style synonym lists ("tench, Tinca tinca"), so an
ImageNet classifier works with the Imagenette class names unchanged.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

import torch

from ._images import batched, load_rgb

__all__ = ["resolve_label", "load_classifier", "predict", "intended_class_accuracy"]


def _norm(text: str) -> str:
    return " ".join(str(text).replace("_", " ").lower().split())


def resolve_label(name: str, id2label: Mapping[int, str]) -> int:
    """The class id whose label (or one of its comma-separated synonyms) is ``name``."""
    wanted = _norm(name)
    hits = sorted({int(i) for i, label in id2label.items()
                   if wanted == _norm(label) or wanted in {_norm(s) for s in str(label).split(",")}})
    if len(hits) == 1:
        return hits[0]
    if not hits and wanted.isdigit() and int(wanted) in {int(i) for i in id2label}:
        return int(wanted)
    if not hits:
        raise ValueError(f"class {name!r} is not one of the classifier's labels "
                         f"(e.g. {list(id2label.values())[:5]})")
    raise ValueError(f"class {name!r} matches several classifier labels: {hits}")


def load_classifier(path: str, device: str = "cpu"):
    """An image classifier and its processor from a local ``from_pretrained`` directory."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    processor = AutoImageProcessor.from_pretrained(path)
    model = AutoModelForImageClassification.from_pretrained(path).to(device).eval()
    return model, processor


@torch.no_grad()
def predict(model, processor, paths: Sequence, batch_size: int = 32) -> List[int]:
    """Predicted class id per image file."""
    device = next(model.parameters()).device
    channels = getattr(model.config, "num_channels", 3)
    preds: List[int] = []
    for chunk in batched(list(paths), batch_size):
        images = load_rgb(chunk)
        if channels == 1:
            images = [im.convert("L") for im in images]
        inputs = processor(images=images, return_tensors="pt").to(device)
        preds.extend(model(**inputs).logits.argmax(-1).tolist())
    return preds


def intended_class_accuracy(predicted: Sequence[int], intended: Sequence[int],
                            forget_classes: Sequence[int],
                            id2label: Optional[Mapping[int, str]] = None) -> Dict[str, object]:
    """Share (in %) of images predicted as their intended class: forget, retain, per class.

    Forget/retain shares pool images (each image counts once); per-class shares are also given
    so a class-averaged number can be read off when image counts differ.
    """
    if len(predicted) != len(intended):
        raise ValueError(f"{len(predicted)} predictions for {len(intended)} images")
    if not intended:
        raise ValueError("no images to score")
    forget = {int(c) for c in forget_classes}
    per_class: Dict[int, List[int]] = {}
    for p, t in zip(predicted, intended):
        per_class.setdefault(int(t), []).append(int(int(p) == int(t)))

    def share(hits: List[int]) -> Optional[float]:
        return 100.0 * sum(hits) / len(hits) if hits else None

    name = (lambda c: str(id2label.get(c, c))) if id2label else str
    forget_hits = [h for c, hs in per_class.items() if c in forget for h in hs]
    retain_hits = [h for c, hs in per_class.items() if c not in forget for h in hs]
    return {
        "forget_accuracy": share(forget_hits), "retain_accuracy": share(retain_hits),
        "forget_images": len(forget_hits), "retain_images": len(retain_hits),
        "per_class": {name(c): share(hs) for c, hs in sorted(per_class.items())},
        "forget_classes": [name(c) for c in sorted(forget)],
    }
