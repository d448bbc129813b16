"""The evaluation report: a readable table, ``metrics.json``, ``summary.md`` and two plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from saelab.evals.geometry import GEOMETRY_KEYS, NEAR_DUPLICATE
from saelab.evals.ground_truth import GROUND_TRUTH_KEYS
from saelab.evals.metrics import DENSE_THRESHOLD, METRIC_KEYS

# What each metric means, for the table's reader and for summary.md.
METRIC_MEANINGS = {
    "l0": "mean number of active (non-zero) latents per token",
    "l1": "mean sum of |latent| per token",
    "mse": "mean squared reconstruction error per activation element",
    "fvu": "fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (mean per "
           "dimension over the evaluated tokens); 0 is perfect, 1 is no better than the mean",
    "explained_variance": "1 - fvu",
    "cossim": "mean cosine similarity between x and its reconstruction",
    "l2_ratio": "mean ||x_hat|| / ||x|| (below 1: the SAE shrinks activations)",
    "ce_clean": "next-token cross-entropy of the unmodified model (nats)",
    "ce_with_sae": "cross-entropy with the SAE's reconstruction spliced in at the hook",
    "ce_zero_ablation": "cross-entropy with the hook's activation set to zero",
    "ce_loss_score": "CE recovered: (ce_zero_ablation - ce_with_sae) / (ce_zero_ablation - ce_clean); 1 is "
                     "perfect, 0 is no better than zero-ablation",
    "kl_with_sae": "mean KL(clean || with SAE) of the next-token distributions",
    "kl_zero_ablation": "mean KL(clean || zero-ablated) of the next-token distributions",
    "kl_score": "(kl_zero_ablation - kl_with_sae) / kl_zero_ablation; 1 is perfect",
    "dead_fraction": "fraction of latents never active on the evaluated tokens",
    "dense_fraction": f"fraction of latents active on more than {DENSE_THRESHOLD:.0%} of tokens",
    "tokens": "tokens evaluated (positions of special tokens excluded unless asked)",
}


def jsonable(value):
    """Tensors to lists, non-finite floats to None (NaN is not JSON), recursively."""
    if isinstance(value, torch.Tensor):
        return jsonable(value.tolist())
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _value(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"


def format_table(metrics: dict, title: str = "evaluation:", keys=None) -> str:
    """The scalar metrics that are present, one per line, in the order of ``keys`` (default: METRIC_KEYS, then
    the ground-truth scores of synthetic data)."""
    keys = dict.fromkeys((*METRIC_KEYS, *GROUND_TRUTH_KEYS)) if keys is None else keys
    rows = [(key, metrics[key]) for key in keys if key in metrics]
    if not rows:
        return f"{title}\n  (no metrics)"
    width = max(len(key) for key, _ in rows)
    return title + "\n" + "\n".join(f"  {key:<{width}}  {_value(value)}" for key, value in rows)


def write_report(report_dir, metrics: dict, info: dict) -> dict[str, Path]:
    """Write metrics.json, summary.md, density_histogram.png and error_by_position.png; return their paths.

    ``metrics`` is what ``evaluate`` returned; ``info`` describes the run (sae, model, hook, dataset ...).
    """
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: report_dir / name for name in ("metrics.json", "summary.md", "density_histogram.png",
                                                  "error_by_position.png")}
    paths["metrics.json"].write_text(json.dumps(report_json(metrics, info), indent=2) + "\n")
    paths["summary.md"].write_text(summary_markdown(metrics, info))
    frequency = metrics.get("firing_frequency")
    plot_density_histogram(frequency if frequency is not None else torch.zeros(0), paths["density_histogram.png"],
                           tokens=metrics.get("tokens", 0))
    plot_error_by_position(metrics.get("error_by_position") or {}, paths["error_by_position.png"],
                           fvu=metrics.get("fvu"))
    if "geometry" in metrics:
        paths["geometry.png"] = plot_geometry(metrics["geometry"], report_dir / "geometry.png")
    if "absorption" in metrics:
        paths["absorption.png"] = plot_absorption(metrics["absorption"], report_dir / "absorption.png")
    return paths


def probing_markdown(probing: dict) -> str:
    """A table: one row per task, the full-activation probe, all latents, then the top-k latents."""
    keys = ["llm_test_accuracy", "sae_test_accuracy", *sorted(
        {key for result in probing["tasks"].values() for key in result if key.startswith("sae_top_")},
        key=lambda key: int(key.split("_")[2]))]
    headers = ["activation", "all latents", *(f"top {key.split('_')[2]}" for key in keys[2:])]
    lines = ["| task | examples | " + " | ".join(headers) + " |", "|---|---|" + "---|" * len(headers)]
    for task, result in {**probing["tasks"], "mean": probing["mean"]}.items():
        lines.append(f"| {task} | {result.get('examples', '')} | " + " | ".join(_value(result.get(key)) for key in keys)
                     + " |")
    return "\n".join(lines)


ABSORPTION_KEYS = ("mean_absorption_fraction_score", "mean_full_absorption_score", "mean_num_split_features",
                   "letters_scored")


def absorption_markdown(absorption: dict) -> str:
    """The mean scores, then one row per letter (those not scored marked), with fully absorbed words."""
    lines = ["| score | value |", "|---|---|"]
    lines += [f"| `{key}` | {_value(absorption.get(key))} |" for key in ABSORPTION_KEYS]
    lines += ["", "| letter | probe F1 | words detected | main latents | absorption fraction | full absorption "
              "| fully absorbed (absorbing latent) |", "|---|---|---|---|---|---|---|"]
    for row in absorption["letters"]:
        examples = ", ".join(f"`{e['word'].strip()}` ({e['absorbing_latent']})" for e in row["absorbed_examples"])
        mark = "" if row["scored"] else " (not scored)"
        lines.append(f"| {row['first_letter']}{mark} | {_value(row['probe_f1'])} | {row['num_probe_true_positives']} "
                     f"| {', '.join(map(str, row['main_latents']))} | {_value(row['mean_absorption_fraction'])} "
                     f"| {_value(row['full_absorption_rate'])} | {examples} |")
    return "\n".join(lines)


def plot_absorption(absorption: dict, out_path) -> Path:
    """Per letter: the absorption fraction and full-absorption rate (bars) and the number of main latents."""
    plt = _pyplot()
    rows = absorption["letters"]
    letters = [row["first_letter"] for row in rows]
    positions = list(range(len(rows)))

    def values(key):
        return [row[key] if row["scored"] and row[key] is not None else float("nan") for row in rows]

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True)
    top.bar([p - 0.2 for p in positions], values("mean_absorption_fraction"), width=0.4, label="absorption fraction")
    top.bar([p + 0.2 for p in positions], values("full_absorption_rate"), width=0.4, label="full absorption rate")
    top.set_ylabel("rate")
    top.set_title(f"first-letter absorption: mean fraction {_value(absorption['mean_absorption_fraction_score'])}, "
                  f"full {_value(absorption['mean_full_absorption_score'])} over {absorption['letters_scored']} "
                  "letters")
    top.legend(fontsize=8)
    bottom.bar(positions, [row["num_split_features"] for row in rows],
               color=["tab:green" if row["scored"] else "lightgrey" for row in rows])
    bottom.set_ylabel("main latents")
    bottom.yaxis.get_major_locator().set_params(integer=True)
    bottom.set_xticks(positions, letters)
    for label, row in zip(bottom.get_xticklabels(), rows):
        label.set_color("black" if row["scored"] else "grey")
    bottom.set_xlabel("first letter (grey: not scored: probe F1 under 0.6 or no test word detected)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return Path(out_path)


def plot_geometry(geometry: dict, out_path) -> Path:
    """Histograms of each latent's largest decoder cosine with another latent and of its encoder/decoder cosine."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "max_decoder_cosine", "largest cosine of a decoder row with another row"),
                           (axes[1], "encoder_decoder_cosine", "cosine of a latent's encoder column and decoder row")):
        values = torch.as_tensor(geometry[key]).flatten().numpy()
        ax.hist(values, bins=50, range=(-1, 1), color="tab:blue")
        ax.set_xlabel(label)
        ax.set_ylabel("latents")
        ax.grid(alpha=0.3)
    axes[0].axvline(NEAR_DUPLICATE, color="tab:red", linestyle="--", linewidth=1,
                    label=f"near-duplicate > {NEAR_DUPLICATE}: {geometry['near_duplicate_latents']:,}")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return Path(out_path)


def report_json(metrics: dict, info: dict) -> dict:
    """The JSON object of a report: the scalar metrics at the top level, then ``error_by_position`` and
    ``eval`` (what was evaluated). The per-latent firing frequency is left out (see the histogram)."""
    out = {key: metrics[key] for key in dict.fromkeys((*METRIC_KEYS, *GROUND_TRUTH_KEYS)) if key in metrics}
    if "error_by_position" in metrics:
        out["error_by_position"] = metrics["error_by_position"]
    for suite in ("probing", "absorption", "by_hook"):
        if suite in metrics:
            out[suite] = metrics[suite]
    if "geometry" in metrics:  # the summaries; the per-latent values are in geometry.png
        out["geometry"] = {key: value for key, value in metrics["geometry"].items()
                           if not isinstance(value, torch.Tensor)}
    out["eval"] = info
    return jsonable(out)


def by_hook_markdown(by_hook: dict) -> str:
    """A crosscoder's or CLT's reconstruction and downstream scores at each of its hooks (a CLT's: with the L0
    of the latents of that hook's block)."""
    per_block = all("l0" in row for row in by_hook.values())
    lines = ["| hook | FVU | explained variance | CE recovered | KL score |" + (" L0 of its block's latents |"
                                                                             if per_block else ""),
             "|---|---|---|---|---|" + ("---|" if per_block else "")]
    for hook, row in by_hook.items():
        lines.append(f"| `{hook}` | {_value(row['fvu'])} | {_value(row['explained_variance'])} | "
                     f"{_value(row.get('ce_loss_score'))} | {_value(row.get('kl_score'))} |"
                     + (f" {_value(row['l0'])} |" if per_block else ""))
    return "\n".join(lines)


def summary_markdown(metrics: dict, info: dict) -> str:
    lines = ["# SAE evaluation", ""]
    described = [("SAE", "sae"), ("architecture", "architecture"), ("kind", "kind"), ("d_in -> d_sae", "shape"),
                 ("model", "model"), ("hook", "hook"), ("output hook (what it predicts)", "hook_out"),
                 ("dataset", "dataset"), ("split", "dataset_split"), ("context size", "context_size"),
                 ("tokens requested", "tokens_requested"), ("contexts", "contexts"),
                 ("special tokens", "special_tokens"), ("device", "device"), ("Neuronpedia", "neuronpedia")]
    info = {**info, "shape": f"{info['d_in']} -> {info['d_sae']}" if "d_in" in info and "d_sae" in info else None}
    if info.get("hook_out"):  # a transcoder's shape includes its output
        described[3] = ("d_in -> d_sae -> d_out", "shape")
        info["shape"] += f" -> {info['d_out']}"
    for label, key in described:
        if info.get(key) is not None:
            lines.append(f"- **{label}**: `{info[key]}`")
    lines.append(f"- **tokens evaluated**: {metrics.get('tokens', 0):,}")
    if not any(key in metrics for key in ("ce_clean", "kl_score")):
        lines.append("- downstream metrics (CE, KL) skipped (`--no-downstream`)")
    lines += ["", "| metric | value | meaning |", "|---|---|---|"]
    for key in dict.fromkeys((*METRIC_KEYS, *GROUND_TRUTH_KEYS)):
        if key in metrics:
            meaning = METRIC_MEANINGS.get(key, "against the true features: see evals/ground_truth.py")
            meaning = meaning.replace("|", "\\|")  # a bare | would end the table cell
            lines.append(f"| `{key}` | {_value(metrics[key])} | {meaning} |")
    if "geometry" in metrics:
        geometry = metrics["geometry"]
        lines += ["", "## Geometry", "", "| measure | value |", "|---|---|"]
        lines += [f"| `{key}` | {_value(geometry.get(key))} |" for key in GEOMETRY_KEYS]
        if "frequency_buckets" in geometry:
            lines += ["", "latents by firing frequency: " + ", ".join(
                f"{name} {count:,}" for name, count in geometry["frequency_buckets"].items())]
        lines += ["", "![geometry](geometry.png)"]
    if "by_hook" in metrics:
        lines += ["", "## Each hook of the crosscoder", "", by_hook_markdown(metrics["by_hook"]), "",
                  "CE/KL per hook: only that hook replaced by its reconstruction (computed from the clean "
                  "activations of every hook); the scores above replace all of them at once."]
    if "probing" in metrics:
        lines += ["", "## Sparse probing (test accuracy)", "", probing_markdown(metrics["probing"])]
    if "absorption" in metrics:
        lines += ["", "## Feature absorption (first letter)", "", absorption_markdown(metrics["absorption"]), "",
                  "![absorption](absorption.png)"]
    lines += ["", "The SAE is spliced in, and zero-ablation applied, only at the evaluated positions; CE and KL "
              "are averaged over next-token predictions whose target is such a position.", "",
              "![latent density](density_histogram.png)", "", "![error by position](error_by_position.png)", ""]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_density_histogram(frequency: torch.Tensor, out_path, tokens: int = 0) -> Path:
    """Histogram of log10(firing frequency) over the latents that fired; dead ones counted in the title."""
    plt = _pyplot()
    frequency = torch.as_tensor(frequency, dtype=torch.float64).flatten()
    live = frequency[frequency > 0]
    dead = int((frequency == 0).sum())
    dense = int((frequency > DENSE_THRESHOLD).sum())
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if len(live):
        ax.hist(torch.log10(live).numpy(), bins=50, color="tab:blue",
                label=f"{len(live):,} live latents ({dense:,} dense, > {DENSE_THRESHOLD:.0%})")
        ax.axvline(math.log10(DENSE_THRESHOLD), color="tab:red", linestyle="--", linewidth=1,
                   label="dense threshold")
    else:
        ax.text(0.5, 0.5, "no latent fired", ha="center", va="center", transform=ax.transAxes)
    ax.plot([], [], " ", label=f"{dead:,} dead latents (never fired; not shown)")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"latent density over {tokens:,} tokens: {dead:,} of {len(frequency):,} latents dead")
    ax.set_xlabel("log10(firing frequency)")
    ax.set_ylabel("latents")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return Path(out_path)


def plot_error_by_position(by_position: dict, out_path, fvu: float | None = None) -> Path:
    """Mean squared error (top) and FVU (bottom) per token position in the context."""
    plt = _pyplot()

    def series(key):
        return [float("nan") if v is None else v for v in by_position.get(key, [])]

    mse, fvu_pos = series("mse"), series("fvu")
    positions = list(range(len(mse)))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot(positions, mse, marker=".", color="tab:blue")
    top.set_ylabel("MSE per element")
    top.set_title("reconstruction error by position in the context (gaps: no evaluated token there)")
    bottom.plot(positions, fvu_pos, marker=".", color="tab:orange", label="FVU at this position")
    if fvu is not None and math.isfinite(fvu):
        bottom.axhline(fvu, color="grey", linestyle="--", linewidth=1, label=f"overall FVU {fvu:.4f}")
    bottom.set_ylabel("FVU")
    bottom.set_xlabel("token position")
    bottom.legend(fontsize=8)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return Path(out_path)
