"""The pictures training makes: a run's training curves (read back from its metrics.jsonl) and a sweep's
Pareto plot (from its results rows)."""

from __future__ import annotations

import math
from pathlib import Path

from saelab.training.trainer import read_metrics

PANELS = (("loss", "loss"), ("fvu", "FVU (training batches)"), ("l0", "L0 (active latents per token)"),
          ("dead_fraction", "dead fraction"))


def plot_training_curves(metrics_path, out_path) -> Path | None:
    """Draw loss, FVU, L0 and dead fraction against training tokens; None when nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
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


def plot_pareto(rows: list[dict], path, title: str = "") -> Path:
    """Explained variance against L0 (log scale), one line per architecture; beside it, each measured of:
    CE-loss recovered, F1 and MCC against the true features (synthetic data), first-letter absorption and
    split features (--suite absorption), top-1 sparse-probing accuracy (--suite probing); three panels a row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    panels = [("explained_variance", "explained variance")]
    if any(row.get("ce_loss_score") is not None for row in rows):
        panels.append(("ce_loss_score", "CE-loss recovered"))
    if any(row.get("mcc") is not None for row in rows):  # synthetic data: how well the true features were found
        panels += [("f1", "F1 of firing (matched true features)"), ("mcc", "MCC (decoder vs true directions)")]
    if any(row.get("mean_absorption_fraction_score") is not None for row in rows):
        panels += [("mean_absorption_fraction_score", "first-letter absorption fraction (lower is better)"),
                   ("mean_num_split_features", "main latents per letter (feature splitting)")]
    if any(row.get("sae_top_1_test_accuracy") is not None for row in rows):
        panels.append(("sae_top_1_test_accuracy", "sparse probing accuracy, top-1 latent"))
    columns = min(3, len(panels))
    lines = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(6.5 * columns, 5 * lines), squeeze=False)
    for ax in axes.flatten()[len(panels):]:
        ax.set_visible(False)
    architectures = list(dict.fromkeys(row["architecture"] for row in rows))
    for ax, (key, label) in zip(axes.flatten(), panels):
        for arch in architectures:
            points = sorted((row["l0"], row[key], row["sparsity_setting"]) for row in rows
                            if row["architecture"] == arch and finite(row.get("l0")) and row["l0"] > 0
                            and finite(row.get(key)))
            if not points:
                continue
            line, = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=arch)
            for x, y, setting in points:
                ax.annotate(setting.split("=")[-1], (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7,
                            color=line.get_color())
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("L0 (active latents per token, held-out)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle(f"{title}\npoints labelled with each architecture's sparsity setting".strip())
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
