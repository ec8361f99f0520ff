"""The forgotten prompt's images one by one: which survive unlearning, and how close they are.

On ten images per prompt, a forget accuracy of 10 % is one image, and the number does not
say what that image is: the forgotten digit coming back, or a drawing of the remap target that
the classifier reads as the forgotten digit. The remap loss cannot tell either: it only asks the
forgotten prompt to predict what the original predicts for the remap prompt. So this module
redraws the forgotten prompt's evaluation images (the same seeded noises as
:func:`~hf_munba.testing.digits_unlearning.evaluate_checkpoints`) for each run and gives the
classifier's probability of the forgotten digit per image, beside two rows from the original
model:

* ``original``: the forgotten prompt itself (what unlearning starts from);
* ``remap target``: the remap prompt drawn from the forgotten prompt's noises, i.e. what a
  perfect remap would draw for each of them. An image that is borderline here (a probability of
  the forgotten digit well above the others') stays borderline for any method that learns the
  remap, so a run that keeps it is at a limit of the measurement, not of the method.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..evaluation.results import markdown_table
from .digits import digit_prompt, generate_digit_images

__all__ = ["forget_image_probabilities", "forget_images_markdown", "forget_images_grid", "ORIGINAL",
           "REMAP_TARGET"]

ORIGINAL = "original"
REMAP_TARGET = "remap target"


def _row(classifier, images: torch.Tensor, forget_digit: int, remap_digit: int) -> Dict:
    with torch.no_grad():
        probs = classifier(pixel_values=images).logits.softmax(-1)
    predicted = probs.argmax(-1)
    return {"predicted": [int(p) for p in predicted],
            "p_forget": [float(p) for p in probs[:, forget_digit]],
            "p_remap": [float(p) for p in probs[:, remap_digit]],
            "forget_accuracy": 100.0 * float((predicted == forget_digit).float().mean())}


def forget_image_probabilities(pipeline_path: str, classifier_path: str,
                               runs: Sequence[Tuple[str, Optional[str], bool]], *,
                               forget_digit: int, remap_digit: int, num_images_per_prompt: int,
                               guidance_scale: float, num_inference_steps: int, seed: int = 0
                               ) -> Tuple[Dict, Dict[str, torch.Tensor]]:
    """Per image of the forgotten prompt: the classifier's prediction and its probabilities of
    the forgotten and of the remap digit, for each run and for the two references.

    ``runs``: ``(name, folder, lora)`` per run, ``folder`` a training-script output or
    checkpoint directory (see :func:`~hf_munba.testing.digits_unlearning.trained_weights`).
    The generation settings must be the evaluation's (``results.json``'s ``settings``) for the
    images to be the ones it counted. Returns ``(report, images)``: ``report["rows"]`` maps
    ``original``, ``remap target`` and every run name to ``predicted`` / ``p_forget`` /
    ``p_remap`` lists and its ``forget_accuracy`` (%); ``images`` maps the same names to the
    (n, 3, R, R) images in [-1, 1].
    """
    from .digits_unlearning import load_digit_evaluator, trained_weights

    if forget_digit == remap_digit:
        raise ValueError(f"remap_digit must differ from forget_digit ({forget_digit})")
    names = [name for name, _, _ in runs]
    if len(set(names)) != len(names) or {ORIGINAL, REMAP_TARGET} & set(names):
        raise ValueError(f"run names must be unique and not {ORIGINAL!r} / {REMAP_TARGET!r}: {names}")
    pipe, classifier = load_digit_evaluator(pipeline_path, classifier_path)
    base_state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}

    def draw(prompt_digit: int) -> torch.Tensor:
        # noise_of: image k is always drawn from the forgotten prompt's k-th evaluation noise
        return generate_digit_images(pipe, [digit_prompt(prompt_digit)], num_images_per_prompt,
                                     guidance_scale, seed, num_inference_steps,
                                     noise_of=[forget_digit])

    images = {ORIGINAL: draw(forget_digit), REMAP_TARGET: draw(remap_digit)}
    for name, folder, lora in runs:
        with trained_weights(pipe, folder, lora=lora, base_state=base_state):
            images[name] = draw(forget_digit)
    rows = {name: _row(classifier, img, forget_digit, remap_digit) for name, img in images.items()}
    report = {"forget_digit": forget_digit, "remap_digit": remap_digit,
              "num_images_per_prompt": num_images_per_prompt, "guidance_scale": guidance_scale,
              "num_inference_steps": num_inference_steps, "seed": seed, "rows": rows}
    return report, images


def forget_images_markdown(report: Mapping) -> str:
    """One row per model, one column per image: p(forgotten digit), bold where the classifier
    calls the image the forgotten digit (the images the forget accuracy counts)."""
    f, r = report["forget_digit"], report["remap_digit"]
    n = report["num_images_per_prompt"]
    body: List[List[str]] = []
    for name, row in report["rows"].items():
        cells = [f"**{p:.2f}**" if d == f else f"{p:.2f}"
                 for p, d in zip(row["p_forget"], row["predicted"])]
        body.append([name, f"{row['forget_accuracy']:.0f}", *cells])
    what = {ORIGINAL: f'the original, prompt "{f}"',
            REMAP_TARGET: f'the original, prompt "{r}" from the same noises (a perfect remap)'}
    lines = [f'Probability of "{f}" for each of the forgotten prompt\'s {n} evaluation images '
             f"(guidance {report['guidance_scale']:g}, {report['num_inference_steps']} steps, "
             f"seed {report['seed']}); bold: the classifier calls it \"{f}\".",
             "", markdown_table(["model", "forget acc (%)", *[f"image {k}" for k in range(n)]], body),
             "", *[f"- `{k}`: {v}" for k, v in what.items()]]
    return "\n".join(lines) + "\n"


def forget_images_grid(images: Mapping[str, torch.Tensor], path=None):
    """The images of :func:`forget_image_probabilities`, one row per model (PNG at ``path``,
    written atomically); returns the PIL image."""
    from PIL import Image

    from ..evaluation.grid import image_grid
    from .digits_unlearning import _to_uint8

    rows = {name: [Image.fromarray(a) for a in _to_uint8(img)] for name, img in images.items()}
    return image_grid(rows, path, cell=48, label_width=130)
