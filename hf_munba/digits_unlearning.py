"""Class forgetting on the self-trained digits pipeline: the paper's Imagenette protocol, on real data.

The paper forgets an Imagenette class c by remapping its prompt to class c+1 and reports the share
of generated images a classifier assigns to the prompted class: for the forgotten prompt (should
fall) and for the others (should stay). Here the classes are the ten digits of
:mod:`hf_munba.digits`; this module holds the pieces an experiment needs besides the training
script and the evaluation suite:

* :func:`write_digit_imagefolders` - D_f / D_r as imagefolders of *real* digit images with their
  captions (what ``training/train_munba_sd.py --forget_data_dir/--retain_data_dir`` reads);
* :func:`write_digit_prompt_csv` - the ten labelled prompts for ``evaluate_generation``;
* :data:`METHODS` - the compared unlearning methods as training-script arguments;
* :func:`summarize_runs` / :func:`summary_markdown` - mean and spread over seeds.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from .atomic_save import atomic_directory
from .digits import DIGIT_WORDS, PROMPT_TEMPLATE, digit_prompt, load_digits

__all__ = ["METHODS", "write_digit_imagefolders", "write_digit_prompt_csv",
           "train_script_args", "summarize_runs", "summary_markdown"]

# Training-script arguments per compared method. "ga" is gradient ascent on the forget set's
# denoising loss alongside the retain loss (L_r - L_f, i.e. GradDiff); "retain" fine-tunes on D_r
# only (lambda = 0), the "does forgetting come for free?" control.
METHODS: Dict[str, List[str]] = {
    "munba": ["--method", "munba", "--forget_objective", "remap"],
    "weighted": ["--method", "weighted", "--forget_weight", "1.0", "--forget_objective", "remap"],
    "ga": ["--method", "weighted", "--forget_weight", "1.0", "--forget_objective", "ga"],
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
                      resolution: int = 16) -> List[str]:
    """Arguments of ``training/train_munba_sd.py`` for one run of the class-forgetting experiment.

    Class-wise mode of the script: all ten digit words as class names, the forgotten digit's
    prompt remapped to ``remap_digit`` (default: the next digit, as the paper does).
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
            "--checkpointing_steps", str(10 ** 9), "--report_to", "none",
            *METHODS[method]]
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
