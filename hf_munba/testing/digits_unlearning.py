"""Class forgetting on the self-trained digits pipeline: the paper's Imagenette protocol, on real data.

The paper forgets an Imagenette class c by remapping its prompt to class c+1 and reports the share
of generated images a classifier assigns to the prompted class: for the forgotten prompt (should
fall) and for the others (should stay). Here the classes are the ten digits of
:mod:`hf_munba.testing.digits`; this module holds the pieces an experiment needs besides the training
script and the evaluation suite:

* :func:`write_digit_imagefolders` - D_f / D_r as imagefolders of *real* digit images with their
  captions (what ``training/train_munba_sd.py --forget_data_dir/--retain_data_dir`` reads);
* :func:`write_digit_prompt_csv` - the ten labelled prompts for ``evaluate_generation``;
* :data:`METHODS` - the compared unlearning methods as training-script arguments;
* :func:`evaluate_checkpoints` - forget / retained accuracy of a run at each saved step, in one
  process (the pipeline and classifier load once, :func:`load_digit_evaluator`; each checkpoint
  swaps only the weights, :func:`trained_weights`);
* :func:`summarize_runs` / :func:`summary_markdown` - end-of-run mean and spread over seeds;
* :func:`summarize_curves` / :func:`curve_markdown` / :func:`plot_digit_curves` - the trade-off
  over training: the forget-vs-retained curve, the retained accuracy at the first evaluation that
  reaches the forgetting threshold, and the best retained accuracy among those that do.

The trade-off math itself (first / best at a forget criterion, mean +- std over seeds, the curve
panels) is :mod:`hf_munba.evaluation.tradeoff`'s, shared with the classifier benchmark; this
module only maps the digits runs (``forget_accuracy`` / ``retain_accuracy`` per method and
variant) onto it and lays out the digits tables.
"""

from __future__ import annotations

import csv
import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..evaluation.results import deprecated_alias, markdown_table
from ..evaluation.tradeoff import (ForgetCriterion, aggregate_curves, aggregate_first_best,
                                   best_at_forgetting, draw_tradeoff, first_and_best, mean_std,
                                   save_figure)
from ..utils.atomic_save import atomic_directory
from .digits import DIGIT_WORDS, PROMPT_TEMPLATE, digit_prompt, load_digits

__all__ = ["METHODS", "method_args", "method_name", "WEIGHTED_LAMBDAS", "FORGET_THRESHOLD", "write_digit_imagefolders",
           "write_digit_prompt_csv", "train_script_args", "evaluate_checkpoints", "load_digit_evaluator",
           "trained_weights",
           "summarize_runs", "summary_markdown", "summarize_curves", "curve_markdown",
           "best_weighted", "plot_digit_curves", "plot_tradeoff_curves", "concept_remaps",
           "write_concept_imagefolders", "write_concept_manifest", "concept_train_script_args",
           "CONCEPT_MODES"]

# How several forgotten digits are unlearned: each its own bargaining player, all pooled into one
# forget player, or one after the other (one run per digit, each starting from the last's model).
CONCEPT_MODES = ("per_concept", "pooled", "sequential")

# The weighted sum's lambda sweep (each its own method, weighted-<lambda>): the baseline gets its
# own small hyper-parameter search before it is compared. 0.01 and 0.03 because the distilled
# retain loss starts at zero and stays small: its best lambda is far below the denoising loss's.
WEIGHTED_LAMBDAS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
# "Forgotten": forget accuracy at or below this share (%) of the forgotten prompt's images.
FORGET_THRESHOLD = 5.0

# Training-script arguments per compared method. "munba" is hf_munba's recommended configuration
# (what `--method munba` does with no other flag: the distilled retain loss, the forget player
# leaving once satisfied); "munba-paper" is the paper's method as published: equal powers every
# step and the denoising loss on D_r as the retain player. "weighted-ga" is gradient
# ascent on the forget set's denoising loss alongside the retain loss (L_r - L_f, i.e. GradDiff;
# the registry's "ga" is ascent on D_f alone); "retain" fine-tunes on D_r only (the registry's
# "ft"), the "does forgetting come for free?" control.
METHODS: Dict[str, List[str]] = {
    "munba": ["--method", "munba", "--forget_objective", "remap"],
    "munba-paper": ["--method", "munba-paper", "--forget_objective", "remap",
                    "--retain_objective", "denoise"],
    **{f"weighted-{lam:g}": ["--method", "weighted", "--forget_weight", f"{lam:g}",
                             "--forget_objective", "remap"] for lam in WEIGHTED_LAMBDAS},
    "weighted-ga": ["--method", "weighted", "--forget_weight", "1.0", "--forget_objective", "ga"],
    "retain": ["--method", "ft"],
}


def method_args(method: str) -> List[str]:
    """The training-script arguments of one compared method: a :data:`METHODS` row, or
    ``weighted-<λ>`` for any λ > 0 (the default sweep is :data:`WEIGHTED_LAMBDAS`; a λ between
    its values is how a gap in the baseline's search is checked). One ``ValueError`` otherwise."""
    if method in METHODS:
        return list(METHODS[method])
    if method.startswith("weighted-") and method != "weighted-ga":
        try:
            lam = float(method.removeprefix("weighted-"))
        except ValueError:
            lam = None
        if lam is not None and math.isfinite(lam) and lam > 0 and method == f"weighted-{lam:g}":
            return ["--method", "weighted", "--forget_weight", f"{lam:g}", "--forget_objective", "remap"]
    raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)} or weighted-<λ> "
                     "with λ > 0 written the shortest way (weighted-0.2, not weighted-0.20)")


def method_name(method: str) -> str:
    """``argparse`` type of the experiments' ``--methods``: ``method`` if :func:`method_args`
    knows it, else the reason, as argparse's own error (before any model work)."""
    import argparse

    try:
        method_args(method)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return method


def _check_digit(d: int, what: str) -> int:
    if not isinstance(d, int) or not 0 <= d <= 9:
        raise ValueError(f"{what} must be a digit 0..9, got {d!r}")
    return d


def _to_uint8(images):
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8, the way the real images were written."""
    return ((images + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def _write_folder(folder: Path, images, labels) -> int:
    from PIL import Image

    folder.mkdir(parents=True)
    u8 = _to_uint8(images)
    lines = []
    for n, (arr, y) in enumerate(zip(u8, labels.tolist())):
        name = f"{n:05d}_{y}.png"
        Image.fromarray(arr, mode="RGB").save(folder / name)
        lines.append(json.dumps({"file_name": name, "text": digit_prompt(y), "label": str(y)}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)


def write_digit_imagefolders(output_dir: str | os.PathLike, forget_digit: int,
                             resolution: int = 16) -> Dict[str, str]:
    """Write ``<output_dir>/forget`` (every real image of ``forget_digit``) and ``<output_dir>/retain``
    (every other digit), each with a ``metadata.jsonl`` of captions ("a handwritten digit three").

    The two folders never share an image. Written into a temp dir and renamed into place; an
    existing ``output_dir`` holding both folders is reused as is (they depend only on the digit).
    """
    _check_digit(forget_digit, "forget_digit")
    out = Path(output_dir)
    marker = out / "digits_data.json"
    spec = {"forget_digit": forget_digit, "resolution": resolution}
    if marker.is_file():
        if json.loads(marker.read_text()) != spec:
            raise ValueError(f"{out} holds digit data for {marker.read_text()}, not {spec}")
        return {"forget": str(out / "forget"), "retain": str(out / "retain")}
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists, is not empty and holds no digits data")
    images, labels, _ = load_digits(resolution)
    is_forget = labels == forget_digit
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(out) as tmp:
        _write_folder(tmp / "forget", images[is_forget], labels[is_forget])
        _write_folder(tmp / "retain", images[~is_forget], labels[~is_forget])
        (tmp / "digits_data.json").write_text(json.dumps(spec))
    return {"forget": str(out / "forget"), "retain": str(out / "retain")}


def concept_remaps(forget_digits: Sequence[int]) -> Dict[int, int]:
    """Each forgotten digit's remap target: the next digit that is not itself forgotten (the
    paper's c -> c+1, skipping digits that are being erased)."""
    digits = [_check_digit(d, "forget digit") for d in forget_digits]
    if len(set(digits)) != len(digits) or len(digits) > 9:
        raise ValueError(f"forget digits must be distinct and leave one digit, got {digits}")
    out = {}
    for d in digits:
        r = (d + 1) % 10
        while r in digits:
            r = (r + 1) % 10
        out[d] = r
    return out


def write_concept_imagefolders(output_dir: str | os.PathLike, forget_digits: Sequence[int],
                               resolution: int = 16) -> Dict[str, object]:
    """Several forgotten digits: ``<output_dir>/forget_<word>`` per digit (all its real images)
    and ``<output_dir>/retain`` (every digit not forgotten); returns ``{"forget": {digit: folder},
    "retain": folder}``. Atomic and reused as :func:`write_digit_imagefolders` is."""
    digits = sorted(concept_remaps(forget_digits))
    out = Path(output_dir)
    marker = out / "digits_data.json"
    spec = {"forget_digits": digits, "resolution": resolution}
    paths = {"forget": {d: str(out / f"forget_{DIGIT_WORDS[d]}") for d in digits},
             "retain": str(out / "retain")}
    if marker.is_file():
        if json.loads(marker.read_text()) != spec:
            raise ValueError(f"{out} holds digit data for {marker.read_text()}, not {spec}")
        return paths
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists, is not empty and holds no digits data")
    images, labels, _ = load_digits(resolution)
    forgotten = torch.zeros_like(labels, dtype=torch.bool)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(out) as tmp:
        for d in digits:
            _write_folder(tmp / f"forget_{DIGIT_WORDS[d]}", images[labels == d], labels[labels == d])
            forgotten |= labels == d
        _write_folder(tmp / "retain", images[~forgotten], labels[~forgotten])
        (tmp / "digits_data.json").write_text(json.dumps(spec))
    return paths


def write_concept_manifest(path: str | os.PathLike, data: Mapping, forget_digits: Sequence[int]
                           ) -> str:
    """The ``--forget_manifest`` of several digits: per digit (named by its word) its folder,
    its prompt and its remap target's prompt as the anchor."""
    remap = concept_remaps(forget_digits)
    manifest = {DIGIT_WORDS[d]: {"data_dir": data["forget"][d], "prompts": [digit_prompt(d)],
                                 "anchor_prompt": digit_prompt(remap[d])} for d in forget_digits}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return str(path)


def concept_train_script_args(*, method: str, pretrained: str, retain_dir: str, output_dir: str,
                              manifest: Optional[str] = None,
                              single: Optional[Tuple[str, int, int]] = None,
                              forget_players: Optional[str] = None, seed: int = 0,
                              use_lora: bool = False, fuse_lora: bool = False,
                              train_params: str = "xattn", max_train_steps: int = 100,
                              train_batch_size: int = 8, learning_rate: float = 1e-4,
                              rank: int = 4, resolution: int = 16,
                              checkpointing_steps: Optional[int] = None,
                              extra_args: Sequence[str] = ()) -> List[str]:
    """``training/train_munba_sd.py`` arguments for forgetting several digits.

    Either ``manifest`` (every digit at once, ``forget_players`` per_concept or pooled) or
    ``single = (folder, digit, remap digit)`` (one digit: a step of the sequential protocol, its
    prompt remapped to the remap digit's as in :func:`train_script_args`).
    """
    method_flags = method_args(method)
    if (manifest is None) == (single is None):
        raise ValueError("give exactly one of manifest and single")
    args = ["--pretrained_model_name_or_path", pretrained, "--retain_data_dir", retain_dir,
            "--output_dir", output_dir, "--seed", str(seed)]
    if manifest is not None:
        args += ["--forget_manifest", manifest, "--forget_players", forget_players or "per_concept"]
    else:
        folder, digit, remap = single
        args += ["--forget_data_dir", folder, "--forget_prompts", digit_prompt(digit),
                 "--anchor_prompt", digit_prompt(remap)]
    args += ["--resolution", str(resolution), "--cache_latents",
             "--train_params", train_params, "--max_train_steps", str(max_train_steps),
             "--train_batch_size", str(train_batch_size), "--learning_rate", str(learning_rate),
             "--checkpointing_steps", str(checkpointing_steps or 10 ** 9), "--report_to", "none",
             *method_flags, *map(str, extra_args)]
    if use_lora:
        args += ["--use_lora", "--rank", str(rank)] + (["--fuse_lora"] if fuse_lora else [])
    return args


def write_digit_prompt_csv(path: str | os.PathLike) -> str:
    """The ten digit prompts with their class label (the classifier's id2label names "0".."9")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "label"])
        for d in range(10):
            w.writerow([digit_prompt(d), str(d)])
    return str(path)


def train_script_args(*, method: str, pretrained: str, data: Mapping[str, str], output_dir: str,
                      forget_digit: int, remap_digit: Optional[int] = None, seed: int = 0,
                      use_lora: bool = False, train_params: str = "xattn", max_train_steps: int = 100,
                      train_batch_size: int = 8, learning_rate: float = 1e-4, rank: int = 4,
                      resolution: int = 16, checkpointing_steps: Optional[int] = None,
                      extra_args: Sequence[str] = ()) -> List[str]:
    """Arguments of ``training/train_munba_sd.py`` for one run of the class-forgetting experiment.

    Class-wise mode of the script: all ten digit words as class names, the forgotten digit's
    prompt remapped to ``remap_digit`` (default: the next digit, as the paper does).
    ``checkpointing_steps``: save a checkpoint every so many steps (for the curves); default none.
    ``extra_args`` are appended (e.g. forget-target options for a variant of ``munba``).
    """
    method_flags = method_args(method)
    _check_digit(forget_digit, "forget_digit")
    remap = (forget_digit + 1) % 10 if remap_digit is None else _check_digit(remap_digit, "remap_digit")
    if remap == forget_digit:
        raise ValueError("remap_digit must differ from forget_digit")
    args = ["--pretrained_model_name_or_path", pretrained,
            "--forget_data_dir", data["forget"], "--retain_data_dir", data["retain"],
            "--output_dir", output_dir, "--seed", str(seed),
            "--class_names", *DIGIT_WORDS, "--forget_class", DIGIT_WORDS[forget_digit],
            "--remap_class", DIGIT_WORDS[remap],
            "--prompt_template", PROMPT_TEMPLATE.replace("{word}", "{}"),
            "--resolution", str(resolution), "--cache_latents",
            "--train_params", train_params, "--max_train_steps", str(max_train_steps),
            "--train_batch_size", str(train_batch_size), "--learning_rate", str(learning_rate),
            "--checkpointing_steps", str(checkpointing_steps or 10 ** 9), "--report_to", "none",
            *method_flags, *map(str, extra_args)]
    if use_lora:
        args += ["--use_lora", "--rank", str(rank)]
    return args


def _mean_std(values: Sequence[Optional[float]]) -> Tuple[Optional[float], Optional[float]]:
    """:func:`~hf_munba.evaluation.tradeoff.mean_std` as the digits tables hold it: (mean, std),
    None for "no value" (JSON null, a dash in the table) instead of NaN."""
    stat = mean_std([float(v) for v in values if v is not None])
    return (None, None) if stat["n"] == 0 else (stat["mean"], stat["std"])


def _none_if_nan(value):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def summarize_runs(runs: Sequence[Mapping], base: Mapping) -> List[Dict]:
    """Mean and standard deviation over seeds per (method, variant).

    ``runs``: dicts with ``method``, ``variant``, ``seed``, ``forget_accuracy``,
    ``retain_accuracy`` (in %) and optionally ``seconds``. ``base``: the original model's
    ``forget_accuracy`` / ``retain_accuracy``. ``retain_ratio`` is the retained accuracy relative
    to the original model's (the issue's target: >= 95%).
    """
    groups: Dict[tuple, List[Mapping]] = {}
    for r in runs:
        groups.setdefault((r["variant"], r["method"]), []).append(r)
    rows = []
    for (variant, method), rs in groups.items():
        fm, fs = _mean_std([r["forget_accuracy"] for r in rs])
        rm, rsd = _mean_std([r["retain_accuracy"] for r in rs])
        tm, _ = _mean_std([r.get("seconds") for r in rs])
        rows.append({"variant": variant, "method": method, "seeds": len(rs),
                     "forget_accuracy": fm, "forget_accuracy_std": fs,
                     "retain_accuracy": rm, "retain_accuracy_std": rsd,
                     "retain_ratio": (100.0 * rm / base["retain_accuracy"]
                                      if rm is not None and base["retain_accuracy"] else None),
                     "seconds": tm})
    return rows


def _pm(mean, std) -> str:
    return "–" if mean is None else f"{mean:.1f} ± {std:.1f}"


def summary_markdown(rows: Sequence[Mapping], base: Mapping) -> str:
    """The results table: forgetting / retained accuracy (mean +- std over seeds, %)."""
    table = [["original", "–", f"{base['forget_accuracy']:.1f}", f"{base['retain_accuracy']:.1f}",
              "100%", "–"]]
    table += [[r["method"], r["variant"], _pm(r["forget_accuracy"], r["forget_accuracy_std"]),
               _pm(r["retain_accuracy"], r["retain_accuracy_std"]),
               "–" if r["retain_ratio"] is None else f"{r['retain_ratio']:.0f}%",
               "–" if r["seconds"] is None else f"{r['seconds']:.0f}"] for r in rows]
    return markdown_table(["model", "params", "forget acc (%) ↓", "retained acc (%) ↑",
                           "retained / original", "train s / run"], table) + "\n"


def load_digit_evaluator(pipeline_path: str, classifier_path: str):
    """The digits pipeline (progress bar off, no safety checker) and its classifier in eval mode:
    what every evaluation of a run loads once before it swaps trained weights in and out."""
    from diffusers import StableDiffusionPipeline
    from transformers import AutoModelForImageClassification

    pipe = StableDiffusionPipeline.from_pretrained(pipeline_path, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, AutoModelForImageClassification.from_pretrained(classifier_path).eval()


@contextmanager
def trained_weights(pipe, folder: Optional[str], *, lora: bool, base_state: Mapping):
    """``pipe`` with a run's trained weights in it, the base weights back on exit.

    ``folder`` is a training-script checkpoint or output directory: ``unet/`` weights (full
    fine-tuning, loaded through safetensors) or ``pytorch_lora_weights.safetensors``
    (``lora=True``); None leaves the base pipeline as it is. ``base_state`` is a copy of the
    base UNet's state dict, taken once, so that evaluating ten checkpoints swaps weights ten
    times instead of loading the pipeline ten times.
    """
    if folder is None:
        yield pipe
        return
    if lora:
        pipe.load_lora_weights(str(folder))
    else:
        from safetensors.torch import load_file

        pipe.unet.load_state_dict(load_file(str(Path(folder) / "unet" /
                                                "diffusion_pytorch_model.safetensors")))
    try:
        yield pipe
    finally:
        if lora:
            pipe.unload_lora_weights()
        else:
            pipe.unet.load_state_dict(base_state)


def evaluate_checkpoints(pipeline_path: str, classifier_path: str,
                         checkpoints: Sequence[Tuple[int, Optional[str]]], *, lora: bool,
                         forget_digit, num_images_per_prompt: int = 20,
                         guidance_scale: float = 2.0, num_inference_steps: int = 25,
                         seed: int = 0, grid_dir: Optional[str] = None,
                         grid_images: int = 6) -> List[Dict]:
    """Forget / retained accuracy (%) of each ``(step, folder)`` in ``checkpoints``.

    ``folder`` is a training-script checkpoint or output directory: ``unet/`` weights (full
    fine-tuning) or ``pytorch_lora_weights.safetensors`` (``lora=True``); None is the base
    pipeline itself. The pipeline and classifier load once; each point swaps only the trained
    weights, so a curve of ten points costs ten generations, not ten process starts. Images:
    ``num_images_per_prompt`` per digit prompt, seeded per image (:func:`generated_digit_accuracy`),
    the same images at every point. Forget accuracy: share of the forgotten prompt's images the
    classifier calls that digit; retained: the same pooled over the other nine prompts.
    ``grid_dir``: the last point's images for a grid row (``grid_images`` of the forgotten
    digit, then one per other digit) are written there with a ``metadata.jsonl``.

    ``forget_digit`` may be several digits: then ``forget_accuracy`` is the highest of their
    forget accuracies (so "forget accuracy <= 5%" means every digit is forgotten),
    ``forget_accuracy_per_digit`` holds each, and the retained accuracy pools the digits not
    forgotten; the grid row shows ``grid_images`` of the first forgotten digit.
    """
    from .digits import classify_digit_images, generate_digit_images

    forgotten = [forget_digit] if isinstance(forget_digit, int) else list(forget_digit)
    for d in forgotten:
        _check_digit(d, "forget_digit")
    pipe, classifier = load_digit_evaluator(pipeline_path, classifier_path)
    base_state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    prompts = [digit_prompt(d) for d in range(10)]
    out = []
    for n, (step, folder) in enumerate(checkpoints):
        with trained_weights(pipe, folder, lora=lora, base_state=base_state):
            images = generate_digit_images(pipe, prompts, num_images_per_prompt, guidance_scale,
                                           seed, num_inference_steps)
        preds = classify_digit_images(classifier, images).view(10, num_images_per_prompt)
        hits = (preds == torch.arange(10)[:, None]).float()
        keep = [d for d in range(10) if d not in forgotten]
        per_digit = {str(d): 100.0 * float(hits[d].mean()) for d in forgotten}
        point = {"step": int(step), "forget_accuracy": max(per_digit.values()),
                 "retain_accuracy": 100.0 * float(hits[keep].mean()),
                 "per_class": {str(d): 100.0 * float(hits[d].mean()) for d in range(10)}}
        if len(forgotten) > 1:
            point["forget_accuracy_per_digit"] = per_digit
        out.append(point)
        if grid_dir is not None and n == len(checkpoints) - 1:
            _write_grid_row(Path(grid_dir), images.view(10, num_images_per_prompt,
                                                        *images.shape[1:]),
                            forgotten[0], grid_images)
    return out


def _write_grid_row(folder: Path, images, forget_digit: int, n_forget: int) -> None:
    """The images of one grid row (``n_forget`` of the forgotten digit, then one per other digit)
    as PNGs with a ``metadata.jsonl``: the experiment's workers run in other processes, so they
    hand the row over as files; the grid itself is :func:`hf_munba.evaluation.grid.image_grid`."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    picks = [(forget_digit, k) for k in range(min(n_forget, images.shape[1]))]
    picks += [(d, 0) for d in range(10) if d != forget_digit]
    for d, k in picks:
        name = f"{d}_{k:03d}.png"
        Image.fromarray(_to_uint8(images[d, k][None])[0], mode="RGB").save(folder / name)
        lines.append(json.dumps({"file_name": name, "label": str(d)}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


_KEYS = ("forget_accuracy", "retain_accuracy")


def summarize_curves(runs: Sequence[Mapping], threshold: float = FORGET_THRESHOLD) -> List[Dict]:
    """Per (variant, method): the mean +- std curve over seeds and the two trade-off numbers.

    ``runs``: dicts with ``method``, ``variant``, ``seed`` and ``curve`` (a list of
    ``{"step", "forget_accuracy", "retain_accuracy"}``, the same steps in every seed, step 0 the
    original model). Per seed (:func:`~hf_munba.evaluation.tradeoff.first_and_best` with
    forget accuracy <= ``threshold``; step 0 never counts, the method must have taken a step),
    ``first`` is the retained accuracy at the first evaluation meeting it and ``best`` the highest
    retained accuracy over all that do; their mean and std are over the seeds that reached it
    (``reached`` of ``seeds``). ``at_forgetting`` is the generic
    :func:`~hf_munba.evaluation.tradeoff.aggregate_first_best` result the flat fields come from.
    """
    criterion = ForgetCriterion.at_most(threshold)
    groups: Dict[tuple, List[Mapping]] = {}
    for r in runs:
        groups.setdefault((r["variant"], r["method"]), []).append(r)
    rows = []
    for (variant, method), rs in groups.items():
        steps = [p["step"] for p in rs[0]["curve"]]
        if any([p["step"] for p in r["curve"]] != steps for r in rs):
            raise ValueError(f"{method} {variant}: seeds were evaluated at different steps")
        mean_curve = aggregate_curves([[{"step": p["step"], **{k: p[k] for k in _KEYS}}
                                        for p in r["curve"]] for r in rs])
        curve = [{"step": p["step"], **{f: v for k in _KEYS
                                         for f, v in ((k, p[k]["mean"]), (f"{k}_std", p[k]["std"]))}}
                 for p in mean_curve]
        per_seed = {r["seed"]: first_and_best(r["curve"], criterion, key="retain_accuracy",
                                              forget_key="forget_accuracy") for r in rs}
        agg = aggregate_first_best(list(per_seed.values()))
        rows.append({"variant": variant, "method": method, "seeds": len(rs),
                     "reached": agg["reached"], "threshold": threshold, "curve": curve,
                     "first_retain": _none_if_nan(agg["first"]["mean"]),
                     "first_retain_std": _none_if_nan(agg["first"]["std"]),
                     "first_step": _none_if_nan(agg["first_step"]["mean"]),
                     "best_retain": _none_if_nan(agg["best"]["mean"]),
                     "best_retain_std": _none_if_nan(agg["best"]["std"]),
                     "per_seed": {str(k): {"first_retain": _none_if_nan(v["first"]),
                                           "first_step": v["first_step"],
                                           "best_retain": _none_if_nan(v["best"])}
                                  for k, v in per_seed.items()},
                     "at_forgetting": agg})
    return rows


def best_weighted(rows: Sequence[Mapping], variant: str, key: str) -> Optional[Mapping]:
    """The weighted-<lambda> row of ``variant`` with the highest mean ``key`` (``first_retain``
    or ``best_retain``) among those that reached the threshold in every seed (None if none):
    :func:`~hf_munba.evaluation.tradeoff.best_at_forgetting` over the weighted rows."""
    which = {"first_retain": "first", "best_retain": "best"}[key]
    cands = {r["method"]: r for r in rows
             if r["variant"] == variant and r["method"].startswith("weighted-")}
    name = best_at_forgetting({m: r["at_forgetting"] for m, r in cands.items()}, which)
    return None if name is None else cands[name]


def curve_markdown(rows: Sequence[Mapping], end_rows: Sequence[Mapping], base: Mapping) -> str:
    """One table: end-of-run numbers beside the trade-off numbers, per method and variant."""
    end = {(r["variant"], r["method"]): r for r in end_rows}
    thr = rows[0]["threshold"] if rows else FORGET_THRESHOLD
    table = [["original", "–", f"{base['forget_accuracy']:.1f}", f"{base['retain_accuracy']:.1f}",
              "–", "–", "–", "–"]]
    for r in rows:
        e = end.get((r["variant"], r["method"]), {})
        table.append([r["method"], r["variant"],
                      _pm(e.get("forget_accuracy"), e.get("forget_accuracy_std")),
                      _pm(e.get("retain_accuracy"), e.get("retain_accuracy_std")),
                      _pm(r["first_retain"], r["first_retain_std"]),
                      "–" if r["first_step"] is None else f"{r['first_step']:.0f}",
                      _pm(r["best_retain"], r["best_retain_std"]), f"{r['reached']}/{r['seeds']}"])
    return markdown_table(
        ["method", "params", "end: forget acc (%) ↓", "end: retained acc (%) ↑",
         f"first point with forget ≤ {thr:g}%: retained (%) ↑", "its step",
         f"best retained (%) with forget ≤ {thr:g}% ↑", "seeds reaching it"], table) + "\n"


def plot_digit_curves(rows: Sequence[Mapping], base: Mapping, path: str | os.PathLike,
                      threshold: float = FORGET_THRESHOLD, title: str = "") -> str:
    """A PNG, one panel per variant: retained vs forget accuracy over training, one line per
    method (mean over seeds at each evaluation, from the original model at step 0), drawn with
    :func:`~hf_munba.evaluation.tradeoff.draw_tradeoff`; green: forget accuracy <= threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, axes = plt.subplots(1, len(variants), figsize=(6.2 * len(variants), 5), squeeze=False,
                             dpi=110)
    for ax, variant in zip(axes[0], variants):
        curves = {r["method"]: r["curve"] for r in rows if r["variant"] == variant}
        draw_tradeoff(ax, curves, "forget_accuracy", "retain_accuracy", band=(0.0, threshold),
                      references={"original": base}, label_end_step=True)
        ax.set_xlabel("forget accuracy (%)  ↓")
        ax.set_ylabel("retained accuracy (%)  ↑")
        ax.set_title(f"{title} {variant}".strip())
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path)


# one release: the name this had, which the classifier plot in evaluation.tradeoff also has
plot_tradeoff_curves = deprecated_alias(plot_digit_curves,
                                        "hf_munba.testing.digits_unlearning.plot_tradeoff_curves",
                                        "hf_munba.testing.digits_unlearning.plot_digit_curves")
