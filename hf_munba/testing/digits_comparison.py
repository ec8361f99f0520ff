"""One setting for every digit: the comparison a user without an oracle gets.

``eval/digits_sd_experiment.py`` compares ``munba`` on one digit with the weighted sum at *that
digit's* best λ, picked after the runs from six values. That is the fairest chance the baseline can
get, and it is an oracle: a user who forgets a new concept does not know which λ will forget it
within the budget, and a λ small enough to keep the most on an easy digit does not forget a hard
one at all. This module pools several experiments (their ``results.json``, one or more per digit,
on the same build and protocol) and asks, per variant, of each setting run unchanged on every
digit: on how many digits did it forget in every seed, and what did it keep at the first and the
best evaluation that forgot. Beside the fixed settings it keeps the per-digit oracle (each digit's
own best λ) as its own row, so both readings stay in one table.

Runs are only pooled when they are comparable: every file must share the protocol (steps,
learning rates, images per prompt, retain loss, forget threshold, ...) and the build, files for
one digit must agree on the original model's numbers, the ``munba`` rows of every file must have
run the same ``--munba_flags``, and a (method, variant, seed) may appear once per digit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from ..evaluation.results import format_cell, markdown_table
from .digits_unlearning import FORGET_THRESHOLD, METHODS, best_weighted, summarize_curves

__all__ = ["PROTOCOL_KEYS", "load_experiments", "compare_across_digits", "across_digits_markdown"]

# What must be equal for two experiments' runs to be compared (the experiment's flags).
PROTOCOL_KEYS = ("train_params", "max_train_steps", "eval_every", "train_batch_size",
                 "learning_rate", "lora_learning_rate", "retain_objective", "forget_threshold",
                 "rank", "guidance_scale", "num_images_per_prompt", "num_inference_steps",
                 "build_seed", "build_unet_steps")
# Methods whose arguments --munba_flags changes (the experiment appends them to these only).
_FLAGGED = ("munba", "munba-paper")


def _read(path) -> Dict:
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no results.json (pass an experiment's output_dir or its "
                                f"results.json)")
    data = json.loads(p.read_text())
    for key in ("settings", "build", "original", "runs"):
        if key not in data:
            raise ValueError(f"{p} is not a digits experiment's results.json (no {key!r})")
    data["_path"] = str(p)
    return data


def load_experiments(paths: Sequence) -> Dict[int, Dict]:
    """Pool experiments by forgotten digit: ``{digit: {"original", "settings", "runs", "sources"}}``
    (``settings``: the first file's, whose protocol every file shares).

    Raises ``ValueError`` naming the two files and the setting when runs are not comparable (see
    the module docstring); nothing is pooled half-way.
    """
    if not paths:
        raise ValueError("give at least one results.json")
    files = [_read(p) for p in paths]
    ref = files[0]
    flagged_ref = None
    for f in files:
        for key in PROTOCOL_KEYS:
            a, b = ref["settings"].get(key), f["settings"].get(key)
            if a != b:
                raise ValueError(f"{f['_path']} and {ref['_path']} ran different protocols: "
                                 f"{key} = {b!r} vs {a!r}")
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
    pooled: Dict[int, Dict] = {}
    for f in files:
        digit = int(f["settings"]["forget_digit"])
        entry = pooled.setdefault(digit, {"original": f["original"], "settings": f["settings"],
                                          "runs": [], "sources": [], "seen": {}})
        orig = entry["original"]
        if (orig["forget_accuracy"], orig["retain_accuracy"]) != (
                f["original"]["forget_accuracy"], f["original"]["retain_accuracy"]):
            raise ValueError(f"{f['_path']} and {entry['sources'][0]} disagree on the original "
                             f"model's accuracy for digit {digit}")
        for r in f["runs"]:
            key = (r["method"], r["variant"], r["seed"])
            if key in entry["seen"]:
                raise ValueError(f"{r['method']} {r['variant']} seed {r['seed']} on digit {digit} "
                                 f"is in both {entry['seen'][key]} and {f['_path']}")
            entry["seen"][key] = f["_path"]
            entry["runs"].append(r)
        entry["sources"].append(f["_path"])
    for entry in pooled.values():
        del entry["seen"]
    return dict(sorted(pooled.items()))


def _method_order(method: str):
    """munba, munba-paper, the weighted sum by λ, then the rest as the experiment lists them."""
    names = list(METHODS)
    if method.startswith("weighted-"):
        try:
            return (1, float(method.removeprefix("weighted-")), method)
        except ValueError:
            pass
    return (0 if method.startswith("munba") else 2, names.index(method) if method in names
            else len(names), method)


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    if not values or any(v is None for v in values):
        return None
    return float(sum(values) / len(values))


def _cell(row: Optional[Mapping]) -> Dict:
    if row is None:
        return {"run": False}
    return {"run": True, "reached": row["reached"], "seeds": row["seeds"],
            "all_seeds": row["reached"] == row["seeds"], "first_retain": row["first_retain"],
            "first_step": row["first_step"], "best_retain": row["best_retain"]}


def compare_across_digits(experiments: Mapping[int, Mapping], threshold: Optional[float] = None,
                          ) -> Dict:
    """Per variant, every setting on every digit, and the verdict ``munba`` vs the best fixed λ.

    ``experiments``: :func:`load_experiments`'s result. ``threshold``: the forget criterion
    (forget accuracy <= it, %); default: the experiments' ``forget_threshold``. A setting counts
    on a digit only if every seed run there reached the criterion (a mean over the lucky seeds is
    not a result); its mean over digits exists only if it counts on every digit. The best fixed λ
    is the weighted-<λ> row with the highest such mean; ``oracle`` is each digit's own best λ
    (the per-digit experiment's comparison). There is no verdict (``met`` None) while some λ
    was run on only some digits: it might have been the one that beats munba there.
    """
    if threshold is None:
        first = next(iter(experiments.values()), {})
        threshold = first.get("settings", {}).get("forget_threshold", FORGET_THRESHOLD)
    thr = float(threshold)
    digits = list(experiments)
    curves = {d: summarize_curves(e["runs"], thr) for d, e in experiments.items()}
    variants = list(dict.fromkeys(r["variant"] for d in digits for r in curves[d]))
    out: Dict[str, Dict] = {"threshold": thr, "digits": digits, "variants": {}}
    for v in variants:
        methods = sorted(dict.fromkeys(r["method"] for d in digits for r in curves[d]
                                       if r["variant"] == v), key=_method_order)
        rows = {}
        for m in methods:
            cells = {str(d): _cell(next((r for r in curves[d] if r["variant"] == v
                                         and r["method"] == m), None)) for d in digits}
            counted = [c for c in cells.values() if c["run"] and c["all_seeds"]]
            every = len(counted) == len(digits)
            rows[m] = {"digits": cells, "digits_run": sum(c["run"] for c in cells.values()),
                       "digits_forgotten": len(counted), "every_digit": every,
                       **{k: _mean([c[k] for c in counted]) if every else None
                          for k in ("first_retain", "best_retain")}}
        oracle = {"digits": {}}
        for key in ("first_retain", "best_retain"):
            picks = {str(d): best_weighted(curves[d], v, key) for d in digits}
            for d, pick in picks.items():
                oracle["digits"].setdefault(d, {})[key] = None if pick is None else pick[key]
                oracle["digits"][d][key.replace("retain", "lambda")] = (
                    None if pick is None else pick["method"])
            oracle[key] = _mean([oracle["digits"][d][key] for d in picks])
        for d in digits:
            oracle["digits"][str(d)]["lambdas_run"] = sum(
                1 for r in curves[d] if r["variant"] == v and r["method"].startswith("weighted-"))
        verdict = {}
        swept = {m: r for m, r in rows.items()
                 if m.startswith("weighted-") and r["digits_run"] == len(digits)}
        fixed = {m: r for m, r in swept.items() if r["every_digit"]}
        mine = rows.get("munba")
        for key in ("first_retain", "best_retain"):
            best = max(fixed, key=lambda m: fixed[m][key], default=None)  # ties: the first λ
            entry = {"best_fixed": best,
                     "best_fixed_value": None if best is None else fixed[best][key],
                     "munba": None if mine is None else mine[key],
                     "munba_digits_forgotten": None if mine is None else mine["digits_forgotten"],
                     "oracle": oracle[key], "lambdas_on_every_digit": list(swept),
                     "lambdas_not_on_every_digit": [m for m in rows if m.startswith("weighted-")
                                                    and m not in swept]}
            if mine is None or not swept or entry["lambdas_not_on_every_digit"]:
                # nothing to compare (no munba, no λ run on every digit), or a sweep with holes:
                # a λ not run on some digit might have been the one that beats munba there
                entry["met"] = None
            elif not mine["every_digit"]:
                entry["met"] = False
            else:
                entry["met"] = best is None or mine[key] >= fixed[best][key]
            verdict[key] = entry
        out["variants"][v] = {"rows": rows, "oracle": oracle, "verdict": verdict}
    return out


def _cell_md(c: Mapping) -> str:
    if not c["run"]:
        return "not run"
    if not c["all_seeds"]:
        return f"{c['reached']}/{c['seeds']} seeds"
    return (f"{format_cell(c['first_retain'], 1)} ({format_cell(c['first_step'], 0)}) / "
            f"{format_cell(c['best_retain'], 1)}")


def across_digits_markdown(result: Mapping) -> str:
    """The tables (one per variant) and the verdict lines of :func:`compare_across_digits`."""
    thr, digits = result["threshold"], result["digits"]
    md: List[str] = []
    for v, entry in result["variants"].items():
        header = (["setting (the same on every digit)"]
                  + [f"forget {d}: first (step) / best" for d in digits]
                  + ["digits forgotten, every seed", "mean first", "mean best"])
        table = []
        for m, r in entry["rows"].items():
            table.append([m] + [_cell_md(r["digits"][str(d)]) for d in digits]
                         + [f"{r['digits_forgotten']}/{len(digits)}",
                            format_cell(r["first_retain"], 1), format_cell(r["best_retain"], 1)])
        o = entry["oracle"]
        table.append(["each digit's best λ (oracle)"] + [
            "no λ run" if not o["digits"][str(d)]["lambdas_run"] else
            "none forgets every seed" if o["digits"][str(d)]["first_retain"] is None else
            f"{format_cell(o['digits'][str(d)]['first_retain'], 1)} "
            f"({o['digits'][str(d)]['first_lambda'].removeprefix('weighted-')}) / "
            f"{format_cell(o['digits'][str(d)]['best_retain'], 1)} "
            f"({o['digits'][str(d)]['best_lambda'].removeprefix('weighted-')})" for d in digits]
            + ["–", format_cell(o["first_retain"], 1), format_cell(o["best_retain"], 1)])
        md += [f"**{v}**: retained accuracy (%) at forget ≤ {thr:g}% (mean over seeds; a digit "
               f"counts when every seed reached it)", "", markdown_table(header, table), ""]
        for key, what in (("first_retain", "first point"), ("best_retain", "best point")):
            x = entry["verdict"][key]
            if x["met"] is None:
                status = ("n/a: run every λ on every digit" if x["lambdas_not_on_every_digit"]
                          else "n/a")
            else:
                status = "met" if x["met"] else "NOT met"
            if not x["lambdas_on_every_digit"]:
                fixed = "no λ run on every digit"
            elif x["best_fixed"] is None:
                fixed = (f"no λ of those run on every digit "
                         f"({', '.join(x['lambdas_on_every_digit'])}) forgets every digit in "
                         f"every seed")
            else:
                fixed = (f"best single λ {x['best_fixed']} "
                         f"{format_cell(x['best_fixed_value'], 1)}")
            if x["lambdas_on_every_digit"] and x["lambdas_not_on_every_digit"]:
                fixed += (f" (not run on every digit: "
                          f"{', '.join(x['lambdas_not_on_every_digit'])})")
            md.append(f"- {v}, {what}: munba {format_cell(x['munba'], 1)} "
                      f"({x['munba_digits_forgotten']}/{len(digits)} digits forgotten in every "
                      f"seed) vs {fixed}; per-digit oracle {format_cell(x['oracle'], 1)}: "
                      f"{status}")
        md.append("")
    return "\n".join(md)
