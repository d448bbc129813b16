"""Training curves as a PNG, read back from the run's metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

PANELS = (("loss", "loss"), ("fvu", "FVU (training batches)"), ("l0", "L0 (active latents per token)"),
          ("dead_fraction", "dead fraction"))


def plot_training_curves(metrics_path, out_path) -> Path | None:
    """Draw loss, FVU, L0 and dead fraction against training tokens; None when nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    if not records:
        return None
    tokens = [r["tokens"] for r in records]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, title) in zip(axes.flat, PANELS):
        ax.plot(tokens, [r.get(key, float("nan")) for r in records], color="tab:blue")
        ax.set_title(title)
        ax.set_xlabel("training tokens")
        ax.grid(alpha=0.3)
        if key in ("loss", "fvu"):
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return Path(out_path)
