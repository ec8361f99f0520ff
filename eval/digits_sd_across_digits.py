#!/usr/bin/env python
"""One setting for every digit: pool digits experiments and compare fixed settings across digits.

    python eval/digits_sd_across_digits.py runs/forget2 runs/forget3 runs/forget5 runs/forget7 \
        --output_dir runs/across_digits

Each argument is an ``eval/digits_sd_experiment.py`` output directory (or its results.json);
several may cover one digit (e.g. the weighted-sum sweep and the ``munba`` rows run apart), as
long as every file ran the same protocol on the same build. Per variant it prints, for every
setting (``munba``, each ``weighted-<λ>``) run unchanged on every digit, the retained accuracy at
the first and the best evaluation with forget accuracy <= 5% per digit, on how many digits it
forgot in every seed, and the mean over digits; then each digit's own best λ (the oracle the
per-digit verdict uses) and the verdict ``munba`` vs the best single λ. With ``--output_dir`` it
writes results.json / results.md there (atomically). Reads only; trains and generates nothing.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+",
                   help="experiment output directories or their results.json files")
    p.add_argument("--output_dir", default=None, help="write results.json / results.md here")
    p.add_argument("--forget_threshold", type=float, default=None,
                   help="forget accuracy (%%) that counts as forgotten (default: the experiments')")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from hf_munba.evaluation.results import write_results
    from hf_munba.testing.digits_comparison import (across_digits_markdown, compare_across_digits,
                                                    load_experiments)

    try:
        experiments = load_experiments(args.results)
    except (FileNotFoundError, ValueError) as err:  # one line, nothing written
        sys.exit(f"error: {err}")
    result = compare_across_digits(experiments, args.forget_threshold)
    result["sources"] = {str(d): e["sources"] for d, e in experiments.items()}
    md = ("# One setting for every digit\n\n"
          f"Digits {', '.join(str(d) for d in result['digits'])}; sources: "
          + "; ".join(f"{d}: {', '.join(s)}" for d, s in result["sources"].items())
          + "\n\n" + across_digits_markdown(result))
    if args.output_dir is not None:
        write_results(args.output_dir, result, markdown=md)
    print(md)


if __name__ == "__main__":
    main()
