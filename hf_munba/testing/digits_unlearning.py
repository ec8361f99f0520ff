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
  process (the pipeline and classifier load once; each checkpoint swaps only the weights);
* :func:`summarize_runs` / :func:`summary_markdown` - end-of-run mean and spread over seeds;
* :func:`summarize_curves` / :func:`curve_markdown` / :func:`plot_tradeoff_curves` - the trade-off
  over training: the forget-vs-retained curve, the retained accuracy at the first evaluation that
  reaches the forgetting threshold, and the best retained accuracy among those that do.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..utils.atomic_save import atomic_directory
from .digits import DIGIT_WORDS, PROMPT_TEMPLATE, digit_prompt, load_digits

__all__ = ["METHODS", "WEIGHTED_LAMBDAS", "FORGET_THRESHOLD", "write_digit_imagefolders",
           "write_digit_prompt_csv", "train_script_args", "evaluate_checkpoints",
           "summarize_runs", "summary_markdown", "summarize_curves", "curve_markdown",
           "best_weighted", "plot_tradeoff_curves"]

# The weighted sum's lambda sweep (each its own method, weighted-<lambda>): the baseline gets its
# own small hyper-parameter search before it is compared.
WEIGHTED_LAMBDAS = (0.1, 0.3, 1.0, 3.0)
# "Forgotten": forget accuracy at or below this share (%) of the forgotten prompt's images.
FORGET_THRESHOLD = 5.0

# Training-script arguments per compared method. "munba" is hf_munba's recommended configuration
# (what `--method munba` does with no other flag: the forget player leaves once satisfied);
# "munba-paper" is the paper's plain rule (equal powers every step). "weighted-ga" is gradient
# ascent on the forget set's denoising loss alongside the retain loss (L_r - L_f, i.e. GradDiff;
# the registry's "ga" is ascent on D_f alone); "retain"
# fine-tunes on D_r only (lambda = 0), the "does forgetting come for free?" control.
METHODS: Dict[str, List[str]] = {
    "munba": ["--method", "munba", "--forget_objective", "remap"],
    "munba-paper": ["--method", "munba-paper", "--forget_objective", "remap"],
    **{f"weighted-{lam:g}": ["--method", "weighted", "--forget_weight", f"{lam:g}",
                             "--forget_objective", "remap"] for lam in WEIGHTED_LAMBDAS},
    "weighted-ga": ["--method", "weighted", "--forget_weight", "1.0", "--forget_objective", "ga"],
    "retain": ["--method", "weighted", "--forget_weight", "0.0", "--forget_objective", "remap"],
}


def _check_digit(d: int, what: str) -> int:
    if not isinstance(d, int) or not 0 <= d <= 9:
        raise ValueError(f"{what} must be a digit 0..9, got {d!r}")
    return d


def _write_folder(folder: Path, images, labels) -> int:
    from PIL import Image

    folder.mkdir(parents=True)
    u8 = ((images + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
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
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
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
            *METHODS[method], *map(str, extra_args)]
    if use_lora:
        args += ["--use_lora", "--rank", str(rank)]
    return args


def _mean_std(values: Sequence[float]):
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


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


def summary_markdown(rows: Sequence[Mapping], base: Mapping) -> str:
    """The results table: forgetting / retained accuracy (mean +- std over seeds, %)."""

    def pm(m, s):
        return "–" if m is None else f"{m:.1f} ± {s:.1f}"

    lines = ["| model | params | forget acc (%) ↓ | retained acc (%) ↑ | retained / original "
             "| train s / run |", "|---|---|---|---|---|---|",
             f"| original | – | {base['forget_accuracy']:.1f} | {base['retain_accuracy']:.1f} "
             f"| 100% | – |"]
    for r in rows:
        ratio = "–" if r["retain_ratio"] is None else f"{r['retain_ratio']:.0f}%"
        secs = "–" if r["seconds"] is None else f"{r['seconds']:.0f}"
        lines.append(f"| {r['method']} | {r['variant']} | "
                     f"{pm(r['forget_accuracy'], r['forget_accuracy_std'])} | "
                     f"{pm(r['retain_accuracy'], r['retain_accuracy_std'])} | {ratio} | {secs} |")
    return "\n".join(lines) + "\n"


def evaluate_checkpoints(pipeline_path: str, classifier_path: str,
                         checkpoints: Sequence[Tuple[int, Optional[str]]], *, lora: bool,
                         forget_digit: int, num_images_per_prompt: int = 20,
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
    """
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file
    from transformers import AutoModelForImageClassification

    from .digits import classify_digit_images, generate_digit_images

    _check_digit(forget_digit, "forget_digit")
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_path, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    classifier = AutoModelForImageClassification.from_pretrained(classifier_path).eval()
    base_state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    prompts = [digit_prompt(d) for d in range(10)]
    out = []
    for n, (step, folder) in enumerate(checkpoints):
        if folder is not None and lora:
            pipe.load_lora_weights(str(folder))
        elif folder is not None:
            pipe.unet.load_state_dict(load_file(str(Path(folder) / "unet" /
                                                    "diffusion_pytorch_model.safetensors")))
        images = generate_digit_images(pipe, prompts, num_images_per_prompt, guidance_scale,
                                       seed, num_inference_steps)
        preds = classify_digit_images(classifier, images).view(10, num_images_per_prompt)
        hits = (preds == torch.arange(10)[:, None]).float()
        keep = [d for d in range(10) if d != forget_digit]
        out.append({"step": int(step),
                    "forget_accuracy": 100.0 * float(hits[forget_digit].mean()),
                    "retain_accuracy": 100.0 * float(hits[keep].mean()),
                    "per_class": {str(d): 100.0 * float(hits[d].mean()) for d in range(10)}})
        if grid_dir is not None and n == len(checkpoints) - 1:
            _write_grid_images(Path(grid_dir), images.view(10, num_images_per_prompt,
                                                           *images.shape[1:]),
                               forget_digit, grid_images)
        if folder is not None and lora:
            pipe.unload_lora_weights()
        elif folder is not None:
            pipe.unet.load_state_dict(base_state)
    return out


def _write_grid_images(folder: Path, images, forget_digit: int, n_forget: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    picks = [(forget_digit, k) for k in range(min(n_forget, images.shape[1]))]
    picks += [(d, 0) for d in range(10) if d != forget_digit]
    for d, k in picks:
        arr = ((images[d, k] + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        name = f"{d}_{k:03d}.png"
        Image.fromarray(arr, mode="RGB").save(folder / name)
        lines.append(json.dumps({"file_name": name, "label": str(d)}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _first_and_best(points: Sequence[Mapping], threshold: float):
    """(retained at the first point with forget <= threshold, its step, best retained there)."""
    ok = [p for p in points if p["forget_accuracy"] <= threshold]
    if not ok:
        return None, None, None
    return ok[0]["retain_accuracy"], ok[0]["step"], max(p["retain_accuracy"] for p in ok)


def summarize_curves(runs: Sequence[Mapping], threshold: float = FORGET_THRESHOLD) -> List[Dict]:
    """Per (variant, method): the mean +- std curve over seeds and the two trade-off numbers.

    ``runs``: dicts with ``method``, ``variant``, ``seed`` and ``curve`` (a list of
    ``{"step", "forget_accuracy", "retain_accuracy"}``, the same steps in every seed).
    Per seed, ``first`` is the retained accuracy at the first evaluation with forget accuracy
    <= ``threshold`` and ``best`` the highest retained accuracy over all such evaluations; their
    mean and std are over the seeds that reached the threshold (``reached`` of ``seeds``).
    """
    groups: Dict[tuple, List[Mapping]] = {}
    for r in runs:
        groups.setdefault((r["variant"], r["method"]), []).append(r)
    rows = []
    for (variant, method), rs in groups.items():
        steps = [p["step"] for p in rs[0]["curve"]]
        if any([p["step"] for p in r["curve"]] != steps for r in rs):
            raise ValueError(f"{method} {variant}: seeds were evaluated at different steps")
        curve = []
        for i, step in enumerate(steps):
            fm, fs = _mean_std([r["curve"][i]["forget_accuracy"] for r in rs])
            rm, rsd = _mean_std([r["curve"][i]["retain_accuracy"] for r in rs])
            curve.append({"step": step, "forget_accuracy": fm, "forget_accuracy_std": fs,
                          "retain_accuracy": rm, "retain_accuracy_std": rsd})
        per_seed = {r["seed"]: _first_and_best(r["curve"], threshold) for r in rs}
        reached = [v for v in per_seed.values() if v[0] is not None]
        first_m, first_s = _mean_std([v[0] for v in reached])
        best_m, best_s = _mean_std([v[2] for v in reached])
        step_m, _ = _mean_std([v[1] for v in reached])
        rows.append({"variant": variant, "method": method, "seeds": len(rs),
                     "reached": len(reached), "threshold": threshold, "curve": curve,
                     "first_retain": first_m, "first_retain_std": first_s,
                     "first_step": step_m, "best_retain": best_m, "best_retain_std": best_s,
                     "per_seed": {str(k): {"first_retain": v[0], "first_step": v[1],
                                           "best_retain": v[2]} for k, v in per_seed.items()}})
    return rows


def best_weighted(rows: Sequence[Mapping], variant: str, key: str) -> Optional[Mapping]:
    """The weighted-<lambda> row of ``variant`` with the highest mean ``key`` (``first_retain``
    or ``best_retain``) among those that reached the threshold in every seed (None if none)."""
    cands = [r for r in rows if r["variant"] == variant and r["method"].startswith("weighted-")
             and r["reached"] == r["seeds"] and r[key] is not None]
    return max(cands, key=lambda r: r[key]) if cands else None


def curve_markdown(rows: Sequence[Mapping], end_rows: Sequence[Mapping], base: Mapping) -> str:
    """One table: end-of-run numbers beside the trade-off numbers, per method and variant."""

    def pm(m, s):
        return "–" if m is None else f"{m:.1f} ± {s:.1f}"

    end = {(r["variant"], r["method"]): r for r in end_rows}
    thr = rows[0]["threshold"] if rows else FORGET_THRESHOLD
    lines = [f"| method | params | end: forget acc (%) ↓ | end: retained acc (%) ↑ | first point "
             f"with forget ≤ {thr:g}%: retained (%) ↑ | its step | best retained (%) with forget "
             f"≤ {thr:g}% ↑ | seeds reaching it |", "|---|---|---|---|---|---|---|---|",
             f"| original | – | {base['forget_accuracy']:.1f} | {base['retain_accuracy']:.1f} "
             f"| – | – | – | – |"]
    for r in rows:
        e = end.get((r["variant"], r["method"]), {})
        step = "–" if r["first_step"] is None else f"{r['first_step']:.0f}"
        lines.append(
            f"| {r['method']} | {r['variant']} | "
            f"{pm(e.get('forget_accuracy'), e.get('forget_accuracy_std'))} | "
            f"{pm(e.get('retain_accuracy'), e.get('retain_accuracy_std'))} | "
            f"{pm(r['first_retain'], r['first_retain_std'])} | {step} | "
            f"{pm(r['best_retain'], r['best_retain_std'])} | {r['reached']}/{r['seeds']} |")
    return "\n".join(lines) + "\n"


def plot_tradeoff_curves(rows: Sequence[Mapping], base: Mapping, path: str | os.PathLike,
                         threshold: float = FORGET_THRESHOLD, title: str = "") -> None:
    """A PNG, one panel per variant: retained vs forget accuracy over training, one line per
    method (mean over seeds at each evaluation, from the original model at step 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, axes = plt.subplots(1, len(variants), figsize=(6.2 * len(variants), 5), squeeze=False)
    for ax, variant in zip(axes[0], variants):
        for r in (r for r in rows if r["variant"] == variant):
            xs = [p["forget_accuracy"] for p in r["curve"]]
            ys = [p["retain_accuracy"] for p in r["curve"]]
            style = dict(lw=2.4) if r["method"] == "munba" else dict(lw=1.2)
            ax.plot(xs, ys, marker="o", ms=3, label=r["method"], **style)
            ax.annotate(str(r["curve"][-1]["step"]), (xs[-1], ys[-1]), fontsize=7)
        ax.scatter([base["forget_accuracy"]], [base["retain_accuracy"]], c="k", marker="*", s=90,
                   zorder=5, label="original")
        ax.axvline(threshold, color="gray", ls="--", lw=0.8)
        ax.set_xlabel("forget accuracy (%)  ↓")
        ax.set_ylabel("retained accuracy (%)  ↑")
        ax.set_title(f"{title} {variant}".strip())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
