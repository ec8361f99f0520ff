"""One setting for every digit: digits experiments pooled for the across-cases comparison.

``eval/digits_sd_experiment.py`` compares ``munba`` on one digit with the weighted sum at *that
digit's* best λ, an oracle a user forgetting a new concept does not have. This module pools
several experiments (their ``results.json``, one or more per digit, on the same build and
protocol) and hands each variant to :func:`hf_munba.evaluation.across_cases.compare_across_cases`:
each setting run unchanged on every digit, beside each digit's own best λ.

Runs are only pooled when they are comparable: every file must share the protocol (steps,
learning rates, images per prompt, retain loss, forget threshold, ...) and the build, files for
one digit must agree on the original model's numbers, the ``munba`` rows of every file must have
run the same ``--munba_flags``, and a (method, variant, seed) may appear once per digit.

The same holds for ``eval/digits_sd_multiconcept.py``'s experiments (several digits forgotten at
once): :func:`load_multiconcept_experiments` pools them by the set of forgotten digits, and
:func:`compare_across_pairs` compares each (method, mode) run unchanged on every set: one λ *and*
one way of handing the digits to the trainer (per concept, pooled, one after the other), which is
what a user without an oracle has to fix in advance.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

from ..evaluation.across_cases import across_cases_markdown, compare_across_cases
from .digits_unlearning import FORGET_THRESHOLD, summarize_curves

__all__ = ["PROTOCOL_KEYS", "load_experiments", "compare_across_digits", "across_digits_markdown",
           "MULTICONCEPT_PROTOCOL_KEYS", "load_multiconcept_experiments", "compare_across_pairs",
           "across_pairs_markdown"]

# What must be equal for two experiments' runs to be compared (the experiment's flags).
PROTOCOL_KEYS = ("train_params", "max_train_steps", "eval_every", "train_batch_size",
                 "learning_rate", "lora_learning_rate", "retain_objective", "forget_threshold",
                 "rank", "guidance_scale", "num_images_per_prompt", "num_inference_steps",
                 "build_seed", "build_unet_steps")
# What digits_sd_multiconcept.py records and two of its experiments must share.
MULTICONCEPT_PROTOCOL_KEYS = ("train_params", "max_train_steps", "eval_every", "train_batch_size",
                              "learning_rate", "lora_learning_rate", "forget_threshold", "rank",
                              "guidance_scale", "num_images_per_prompt", "num_inference_steps")
# Methods whose arguments --munba_flags changes (the experiment appends them to these only).
_FLAGGED = ("munba", "munba-paper")


def _read(path, required=("settings", "build", "original", "runs"),
          what="a digits experiment's") -> Dict:
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no results.json (pass an experiment's output_dir or its "
                                f"results.json)")
    data = json.loads(p.read_text())
    for key in required:
        if key not in data:
            raise ValueError(f"{p} is not {what} results.json (no {key!r})")
    data["_path"] = str(p)
    return data


def _check_protocol(files: Sequence[Dict], keys: Sequence[str]) -> None:
    ref = files[0]
    for f in files:
        for key in keys:
            a, b = ref["settings"].get(key), f["settings"].get(key)
            if a != b:
                raise ValueError(f"{f['_path']} and {ref['_path']} ran different protocols: "
                                 f"{key} = {b!r} vs {a!r}")


def _pool_runs(files: Sequence[Dict], case_of, name_of, check=None) -> Dict:
    """``{case: {"original", "settings", "runs", "sources"}}``: each file's runs under
    ``case_of(file)``, refusing a (method, variant, seed) twice for one case (``name_of(case)``
    says which in the error). ``check(entry, file, case)`` may refuse a file for its case."""
    pooled: Dict = {}
    seen: Dict = {}
    for f in files:
        case = case_of(f)
        entry = pooled.setdefault(case, {"original": f["original"], "settings": f["settings"],
                                         "runs": [], "sources": []})
        if check is not None:
            check(entry, f, case)
        for r in f["runs"]:
            key = (case, r["method"], r["variant"], r["seed"])
            if key in seen:
                raise ValueError(f"{r['method']} {r['variant']} seed {r['seed']} {name_of(case)} "
                                 f"is in both {seen[key]} and {f['_path']}")
            seen[key] = f["_path"]
            entry["runs"].append(r)
        entry["sources"].append(f["_path"])
    return pooled


def load_experiments(paths: Sequence) -> Dict[int, Dict]:
    """Pool experiments by forgotten digit: ``{digit: {"original", "settings", "runs", "sources"}}``
    (``settings``: the first file's, whose protocol every file shares).

    Raises ``ValueError`` naming the two files and the setting when runs are not comparable (see
    the module docstring); nothing is pooled half-way.
    """
    if not paths:
        raise ValueError("give at least one results.json")
    files = [_read(p) for p in paths]
    _check_protocol(files, PROTOCOL_KEYS)
    ref = files[0]
    flagged_ref = None
    for f in files:
        if f["build"].get("metrics") != ref["build"].get("metrics"):
            raise ValueError(f"{f['_path']} and {ref['_path']} evaluated different builds of the "
                             f"digits model (their build metrics differ)")
        if any(r["method"] in _FLAGGED for r in f["runs"]):
            if flagged_ref is None:
                flagged_ref = f
            elif list(f["settings"].get("munba_flags") or []) != list(
                    flagged_ref["settings"].get("munba_flags") or []):
                raise ValueError(
                    f"{f['_path']} and {flagged_ref['_path']} ran munba with different "
                    f"--munba_flags ({f['settings'].get('munba_flags')} vs "
                    f"{flagged_ref['settings'].get('munba_flags')}): one setting must be the "
                    f"same on every digit")

    def same_original(entry, f, digit):
        orig = entry["original"]
        if (orig["forget_accuracy"], orig["retain_accuracy"]) != (
                f["original"]["forget_accuracy"], f["original"]["retain_accuracy"]):
            raise ValueError(f"{f['_path']} and {entry['sources'][0]} disagree on the original "
                             f"model's accuracy for digit {digit}")

    pooled = _pool_runs(files, lambda f: int(f["settings"]["forget_digit"]),
                        lambda digit: f"on digit {digit}", same_original)
    return dict(sorted(pooled.items()))


def compare_across_digits(experiments: Mapping[int, Mapping], threshold: Optional[float] = None,
                          ) -> Dict:
    """Per variant, :func:`~hf_munba.evaluation.across_cases.compare_across_cases` over the
    digits: every setting on every digit, each digit's own best λ, and the verdict ``munba`` vs
    the best fixed λ (``met`` None while some λ was run on only some digits).

    ``experiments``: :func:`load_experiments`'s result. ``threshold``: the forget criterion
    (forget accuracy <= it, %); default: the experiments' ``forget_threshold``.
    """
    if threshold is None:
        first = next(iter(experiments.values()), {})
        threshold = first.get("settings", {}).get("forget_threshold", FORGET_THRESHOLD)
    thr = float(threshold)
    curves = {d: summarize_curves(e["runs"], thr) for d, e in experiments.items()}
    variants = list(dict.fromkeys(r["variant"] for rows in curves.values() for r in rows))
    return {"threshold": thr, "digits": list(experiments), "variants": {
        v: compare_across_cases({str(d): {r["method"]: r["at_forgetting"] for r in rows
                                          if r["variant"] == v} for d, rows in curves.items()})
        for v in variants}}


def across_digits_markdown(result: Mapping) -> str:
    """The tables (one per variant) and the verdict lines of :func:`compare_across_digits`."""
    thr = result["threshold"]
    return "\n".join(
        f"**{v}**: " + across_cases_markdown(entry, noun="digit", label=lambda d: f"forget {d}",
                                             criterion=f"at forget ≤ {thr:g}%", tag=v)
        for v, entry in result["variants"].items())


def load_multiconcept_experiments(paths: Sequence) -> Dict[str, Dict]:
    """Pool ``eval/digits_sd_multiconcept.py`` experiments by their forgotten digits:
    ``{"3+7": {"original", "settings", "runs", "sources"}}``.

    Refused with a ``ValueError`` naming both files: another protocol
    (:data:`MULTICONCEPT_PROTOCOL_KEYS`), another build of the digits model (its results.json
    records no build, so the original model's per-digit accuracies stand for it), or a (method,
    mode, variant, seed) run twice for one set of digits.
    """
    if not paths:
        raise ValueError("give at least one results.json")
    files = [_read(p, ("settings", "original", "runs"), "a digits_sd_multiconcept.py")
             for p in paths]
    for f in files:
        if "forget_digits" not in f["settings"]:
            raise ValueError(f"{f['_path']} is not a digits_sd_multiconcept.py results.json (no "
                             f"forget_digits)")
    _check_protocol(files, MULTICONCEPT_PROTOCOL_KEYS)
    ref = files[0]
    for f in files:
        if f["original"].get("per_class") != ref["original"].get("per_class"):
            raise ValueError(f"{f['_path']} and {ref['_path']} evaluated different builds of the "
                             f"digits model (the original's per-digit accuracies differ)")
    return _pool_runs(files, lambda f: "+".join(str(d) for d in f["settings"]["forget_digits"]),
                      lambda pair: f"forgetting {pair}")


def compare_across_pairs(experiments: Mapping[str, Mapping], ours: str = "munba/per_concept",
                         ) -> Dict:
    """Per variant (full, LoRA), :func:`~hf_munba.evaluation.across_cases.compare_across_cases`
    over the sets of digits, a setting being ``<method>/<mode>``: the verdict ``ours`` (the
    default, a player per digit) vs the best ``weighted-<λ>/<mode>`` fixed for every set, and
    each set's own best (the oracle). A point forgets when every digit of the set is at or below
    the experiments' ``forget_threshold``."""
    first = next(iter(experiments.values()), {})
    thr = float(first.get("settings", {}).get("forget_threshold", FORGET_THRESHOLD))
    cases: Dict[str, Dict[str, Dict]] = {}
    for pair, e in experiments.items():
        for row in summarize_curves(e["runs"], thr):
            params, mode = row["variant"].split("/")
            cases.setdefault(params, {}).setdefault(pair, {})[f"{row['method']}/{mode}"] = (
                row["at_forgetting"])
    return {"threshold": thr, "pairs": list(experiments), "variants": {
        v: compare_across_cases(per_pair, ours=ours) for v, per_pair in cases.items()}}


def across_pairs_markdown(result: Mapping) -> str:
    """The tables (one per variant) and the verdict lines of :func:`compare_across_pairs`."""
    thr = result["threshold"]
    return "\n".join(
        f"**{v}**: " + across_cases_markdown(entry, noun="pair", label=lambda d: f"forget {d}",
                                             criterion=f"with every digit at forget ≤ {thr:g}%",
                                             tag=v)
        for v, entry in result["variants"].items())
