"""A PNG of the per-step unlearning statistics (losses, cosine, weights, gradient norms)."""

from __future__ import annotations

import os
from typing import Dict, Sequence

__all__ = ["plot_training_history"]

PANELS = (("losses", ("loss/retain", "loss/forget")),
          ("cos(g_r, g_f)", ("munba/cos",)),
          ("bargaining weights", ("munba/weight_retain", "munba/weight_forget")),
          ("gradient norms", ("munba/grad_norm_retain", "munba/grad_norm_forget")))


def plot_training_history(history: Sequence[Dict], path: str | os.PathLike,
                          title: str = "MUNBa unlearning") -> str:
    """Write a 2x2 plot of ``history`` (one dict per step, with a "step" key) to ``path``.

    Needs matplotlib (``pip install hf_munba[eval]``); raises ImportError with that hint.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("the training plot needs matplotlib: pip install 'hf_munba[eval]' "
                          "(or pip install matplotlib)") from e
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (name, keys) in zip(axes.flat, PANELS):
        values = []
        for key in keys:
            pts = [(h["step"], h[key]) for h in history if key in h]
            if pts:
                xs, ys = zip(*pts)
                values += ys
                ax.plot(xs, ys, label=key.split("/")[-1])
        if "cos" not in name and values:
            # the two players' losses / weights / norms differ by orders of magnitude
            ax.set_yscale("log" if min(values) > 0 else "symlog")
        ax.set_title(name)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(str(path), dpi=80)
    plt.close(fig)
    return str(path)
