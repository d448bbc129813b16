"""What ``saelab sweep`` does: train a grid of SAEs (architectures x sparsity settings) on one hook point,
all on the same activations, collected from the model once and held in memory; evaluate them together
on the same held-out text (one clean model pass per batch for all); write a table (CSV, markdown) and the
explained-variance-vs-L0 Pareto plot.

Each grid point is an ordinary run folder (checkpoint, metrics.jsonl, training_curves.png, eval.json,
``final/`` SAE) under the sweep folder; a point whose folder already holds its result (or its trained SAE,
awaiting evaluation) for the same config is reused, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from saelab.data.activations import TensorSource
from saelab.evals.metrics import evaluate_many
from saelab.models import load_model, resolve_hook
from saelab.sae.format import load_sae
from saelab.training import TrainConfig, Trainer, plot_training_curves
from saelab.training.config import TOPK_FAMILY, option
from saelab.training.trainer import METRICS_FILE

ROW_FILE = "sweep_row.json"      # a grid point trained and evaluated: its table row
TRAINED_FILE = "trained.json"   # a grid point trained, its evaluation still to come
COLUMNS = ("architecture", "sparsity_setting", "l0", "explained_variance", "ce_loss_score", "kl_score",
           "dead_fraction", "eval_dead_fraction", "train_seconds", "eval_seconds", "wall_seconds",
           "dead_latent_remedy", "run")
# What each architecture's sparsity is set by: the SweepConfig field listing the values, the TrainConfig
# field each value goes to, and the prefix of the value in run folder names (topk-k32, standard-l1_5).
SWEPT_BY = {**{arch: ("k", "k", "k") for arch in TOPK_FAMILY},
            "jumprelu": ("target_l0s", "target_l0", "target_l0_"),
            "standard": ("l1_coefficients", "l1_coefficient", "l1_"),
            "gated": ("l1_coefficients", "l1_coefficient", "l1_")}
# TrainConfig fields a sweep sets per grid point (the CLI does not offer them as shared options).
PER_RUN_FIELDS = ("architecture", "k", "l1_coefficient", "target_l0", "out")
# The L1 coefficients when --l1-coefficients is not given. Gated SAEs penalise the gate's pre-activations,
# standard SAEs the codes, so one list cannot serve both. Measured on SmolLM2-135M blocks.6.hook_resid_post
# (8x, 300k samples of wikitext2-valid, L0 on its held-out first 8k tokens): gated 2, 4, 8 gave L0 55, 18, 5;
# standard 2, 5, 10 gave 87, 69, 61: in 300k samples its encoder bias barely moves from 0, so a larger L1
# mostly shrinks the decoder and costs reconstruction, not L0. (Trained on python-docs and evaluated on
# Wikipedia, every thresholded SAE's L0 is about twice as high: thresholds fit to one kind of text fire more
# on another.)
DEFAULT_L1_COEFFICIENTS = {"standard": "2,5,10", "gated": "2,4,8"}


@dataclass
class SweepConfig:
    architectures: str = option("topk,batchtopk,jumprelu,gated,standard", "Architectures to train, comma-"
                                "separated: topk, batchtopk, matryoshka_batchtopk (alias matryoshka), jumprelu, "
                                "gated, standard.")
    k: str = option("16,32,64", "topk, batchtopk, matryoshka_batchtopk: the values of k, comma-separated.")
    target_l0s: str = option("16,32,64", "jumprelu: the target L0s, comma-separated (each run steers its L0 "
                             "weight toward its target; see --l0-coefficient for the starting weight).")
    l1_coefficients: str | None = option(None, "standard, gated: the L1 coefficients, comma-separated (larger: "
                                         "sparser; inputs are normalised to mean norm sqrt(d_in)). Default: "
                                         + "; ".join(f"{a} {v}" for a, v in DEFAULT_L1_COEFFICIENTS.items())
                                         + " (measured on the default model and hook at 300k tokens: gated "
                                         "spans L0 ~5-55; standard only ~60-90 in so short a run).")
    out: str = option("runs/sweep", "Sweep folder: results.csv, results.md, pareto.png, sweep.json and one "
                      "run folder per grid point.")
    activation_tokens: int | None = option(None, "Training activations collected from the model once and "
                                           "shared by every run (default: --tokens, or the whole corpus when "
                                           "smaller; runs repeat them in epochs). Memory = this x d_in x 4 bytes. Not with --activations: "
                                           "a cache is read from disk as it is.")
    downstream: bool = option(True, "Also measure CE-loss and KL recovered with each SAE spliced into the "
                              "model on the held-out text (--no-downstream: reconstruction metrics only).")

    def __post_init__(self):
        self.architectures = ",".join("matryoshka_batchtopk" if a == "matryoshka" else a
                                      for a in _split(self.architectures))
        unknown = [a for a in _split(self.architectures) if a not in SWEPT_BY]
        problems = [f"unknown architecture {a!r} (sweepable: {', '.join(SWEPT_BY)})" for a in unknown]
        if not _split(self.architectures):
            problems.append("architectures is empty")
        for name, kind in (("k", int), ("target_l0s", float), ("l1_coefficients", float)):
            if getattr(self, name) is None:  # the per-architecture defaults
                continue
            try:
                values = parse_values(getattr(self, name), kind)
            except ValueError as err:
                problems.append(str(err))
                continue
            used = any(SWEPT_BY[a][0] == name for a in _split(self.architectures) if a in SWEPT_BY)
            if used and not values:
                problems.append(f"{name} lists no values")
        if self.activation_tokens is not None and self.activation_tokens <= 0:
            problems.append(f"activation_tokens must be positive (got {self.activation_tokens})")
        if problems:
            raise ValueError("invalid sweep config: " + "; ".join(problems))

    def values_for(self, architecture: str) -> str:
        """The comma-separated sparsity settings this sweep trains ``architecture`` at."""
        given = getattr(self, SWEPT_BY[architecture][0])
        return DEFAULT_L1_COEFFICIENTS[architecture] if given is None else given


@dataclass
class GridPoint:
    architecture: str
    setting: str            # the TrainConfig field set, e.g. "k"
    value: float | int
    cfg: TrainConfig

    @property
    def label(self) -> str:
        return f"{self.setting}={_fmt(self.value)}"

    @property
    def name(self) -> str:
        return f"{self.architecture}-{SWEPT_BY[self.architecture][2]}{_fmt(self.value)}"


@dataclass
class SweepResult:
    out: Path
    rows: list[dict]          # one per grid point trained (or reused), in grid order
    completed: bool           # False when stopped early (Ctrl-C): run the same command again to continue
    collect_seconds: float    # the one pass of the model over the training text (0 when nothing was trained)


def parse_values(text: str, kind=float) -> list:
    """``"16,32,64"`` -> ``[16, 32, 64]``; underscores and spaces are allowed (``1_000``)."""
    values = []
    for item in _split(text):
        try:
            value = kind(item.replace("_", ""))
        except ValueError:
            raise ValueError(f"cannot read {item!r} as a{'n integer' if kind is int else ' number'} "
                             f"in {text!r}") from None
        if not value > 0:
            raise ValueError(f"sweep values must be positive, got {item!r} in {text!r}")
        values.append(value)
    return values


def grid(scfg: SweepConfig, base: TrainConfig) -> list[GridPoint]:
    """Every (architecture, sparsity value) pair, each with its full TrainConfig (validated)."""
    points = []
    for arch in _split(scfg.architectures):
        values_field, setting, _ = SWEPT_BY[arch]
        kind = int if setting == "k" else float
        for value in parse_values(scfg.values_for(arch), kind):
            point = GridPoint(arch, setting, value, base)
            cfg = replace(base, architecture=arch, **{setting: value}, dead_latent_remedy=_remedy_for(base, arch),
                          out=str(Path(scfg.out) / point.name))
            points.append(replace(point, cfg=cfg))
    return points


def base_config(scfg: SweepConfig, **given) -> TrainConfig:
    """The TrainConfig shared by every grid point, from the given fields. Its own architecture is a
    placeholder (each point sets its own): the first listed that takes the chosen dead-latent remedy."""
    remedy = given.get("dead_latent_remedy", "auto")
    takes = {"auxk": TOPK_FAMILY, "ghost_grads": ("standard",)}.get(remedy)
    architectures = _split(scfg.architectures)
    if takes is not None and not any(a in takes for a in architectures):
        raise ValueError(f"dead_latent_remedy {remedy} applies to {', '.join(takes)}, none of which is in "
                         f"architectures ({scfg.architectures})")
    fitting = [a for a in architectures if takes is None or a in takes]
    return TrainConfig(**{**given, "architecture": fitting[0]})


def _remedy_for(base: TrainConfig, arch: str) -> str:
    """The base remedy where the architecture takes it; auto where it does not (auxk only suits the TopK
    family, ghost grads only standard SAEs), so one sweep can mix architectures."""
    remedy = base.dead_latent_remedy
    if (remedy == "auxk" and arch not in TOPK_FAMILY) or (remedy == "ghost_grads" and arch != "standard"):
        return "auto"
    return remedy


def collect_activations(source, max_rows: int, progress: bool = False) -> torch.Tensor:
    """One pass of the model over the text: the first ``max_rows`` activation rows (fewer if the text ends)."""
    chunks, rows = [], 0
    bar = tqdm(total=max_rows, desc="collecting activations", unit="tok", unit_scale=True, disable=not progress)
    units = source.units(0)
    try:
        for chunk in units:
            chunks.append(chunk[:max_rows - rows])
            rows += len(chunks[-1])
            bar.update(len(chunks[-1]))
            if rows >= max_rows:
                break
    finally:
        units.close()
        bar.close()
    if not chunks:
        raise ValueError("the training text gave no activations (check the dataset path, split and text column)")
    return torch.cat(chunks)


class _ModelData:
    """A sweep's data from the model: held-out text evaluated with the model, and the training activations
    collected once into memory (``collect``)."""

    def __init__(self, cfg: TrainConfig):
        from saelab.pipeline import lm_source, sae_metadata

        self.cfg = cfg
        self.model, tokenizer = load_model(cfg.model, cfg.device)
        self.hook = resolve_hook(self.model, cfg.hook)
        self.metadata = sae_metadata(cfg, self.hook.module_path)
        eval_contexts = math.ceil(cfg.eval_tokens / cfg.context_size)
        self.holdout = eval_contexts if cfg.eval_dataset is None else 0
        self.source = lambda dataset, **kwargs: lm_source(cfg, self.model, tokenizer, self.hook, dataset, **kwargs)
        self.eval_dataset = cfg.eval_dataset or cfg.dataset
        self.held_out = self.source(self.eval_dataset, max_contexts=eval_contexts) if cfg.eval_tokens > 0 else None
        self.eval_batches = list(self.held_out.token_batches()) if self.held_out is not None else []

    def collect(self, max_rows: int) -> TensorSource:
        t0 = time.perf_counter()
        acts = collect_activations(self.source(self.cfg.dataset, skip_contexts=self.holdout), max_rows,
                                   self.cfg.progress)
        _say(f"collected {len(acts):,} activation rows of {self.cfg.dataset} once ({time.perf_counter() - t0:.1f} s, "
             f"{acts.numel() * 4 / 2**20:,.0f} MiB); every run trains on them")
        return TensorSource(acts)

    def evaluate_many(self, saes: list, downstream: bool = True) -> list[dict]:
        batches = tqdm(self.eval_batches, desc=f"evaluating {len(saes)} SAEs", unit="batch", leave=False,
                       disable=not self.cfg.progress)
        results = evaluate_many(self.model, [(sae, self.hook) for sae in saes], batches, self.held_out.keep_mask,
                                downstream=downstream)
        return [{**metrics, "eval_dataset": self.eval_dataset} for metrics in results]


def sweep(scfg: SweepConfig, base: TrainConfig, overwrite: bool = False) -> SweepResult:
    """Train and evaluate every grid point; write results.csv, results.md, pareto.png and sweep.json."""
    from saelab.pipeline import CachedData

    out = Path(scfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if base.activations is not None and scfg.activation_tokens is not None:
        raise ValueError("--activation-tokens sets how many activations to collect from the model; with "
                         "--activations the cache is used as it is (write a smaller one with `saelab cache --tokens`)")
    torch.manual_seed(base.seed)
    data = CachedData(base) if base.activations is not None else _ModelData(base)
    base = data.cfg
    points = grid(scfg, base)
    train_source, activation_rows, collect_seconds, completed = None, None, 0.0, True
    rows: dict[str, dict] = {}          # grid point name -> its table row
    to_evaluate: list[tuple] = []       # (point, sae, training figures): trained, evaluated together at the end
    _say(f"sweep of {len(points)} SAEs on {base.model} {base.hook} into {out}: "
         + ", ".join(p.name for p in points))
    for index, point in enumerate(points, 1):
        run_dir = Path(point.cfg.out)
        reused = None if overwrite else _saved_for(run_dir / ROW_FILE, point.cfg, "row")
        if reused is not None:
            _say(f"[{index}/{len(points)}] {point.name}: reusing the finished run in {run_dir}")
            rows[point.name] = reused
            continue
        trained = None if overwrite else _saved_for(run_dir / TRAINED_FILE, point.cfg, "trained")
        if trained is not None:
            _say(f"[{index}/{len(points)}] {point.name}: trained earlier in {run_dir}; evaluated with the others")
            to_evaluate.append((point, load_sae(run_dir / "final"), trained))
            continue
        if train_source is None:
            t0 = time.perf_counter()
            if isinstance(data, CachedData):
                train_source, activation_rows = data.train_source, data.train_source.rows()
                _say(f"every run trains on the {activation_rows:,} activation rows cached in {base.activations} "
                     "(the model is not loaded)")
            else:
                train_source = data.collect(scfg.activation_tokens or base.tokens)
                activation_rows = len(train_source.data)
            collect_seconds = time.perf_counter() - t0
        _say(f"[{index}/{len(points)}] training {point.name} ({point.label}, {point.cfg.tokens:,} tokens)")
        trainer = Trainer(point.cfg, train_source, run_dir, metadata=data.metadata)
        result = trainer.run()
        plot_training_curves(run_dir / METRICS_FILE, run_dir / "training_curves.png")
        if not result.completed:
            _say(f"stopped during {point.name}; run the same command again to continue the sweep")
            completed = False
            break
        # Saved now (with training firing frequencies), so a sweep stopped later keeps this SAE.
        result.sae.save(run_dir / "final", sparsity=torch.log10(result.firing_frequency + 1e-10),
                        runner_cfg=asdict(point.cfg))
        trained = {"train_tokens": result.tokens, "train_seconds": result.seconds,
                   "dead_fraction": float((trainer.tokens_since_fired >= point.cfg.dead_window_tokens).float().mean())}
        (run_dir / TRAINED_FILE).write_text(json.dumps({"config": asdict(point.cfg), "trained": trained}, indent=2))
        to_evaluate.append((point, result.sae, trained))
    if completed and to_evaluate:
        rows.update(_evaluate_together(data, to_evaluate, scfg, base))
    rows = [rows[point.name] for point in points if point.name in rows]

    write_table(rows, out / "results.csv", out / "results.md")
    plot_pareto(rows, out / "pareto.png", title=f"{base.model} {base.hook}")
    (out / "sweep.json").write_text(json.dumps({
        "sweep": asdict(scfg), "shared": {k: v for k, v in asdict(base).items() if k not in PER_RUN_FIELDS},
        "activation_rows": activation_rows, "collect_seconds": collect_seconds,
        "completed": completed, "rows": rows}, indent=2))
    _say(f"results in {out / 'results.md'} (and .csv); Pareto plot in {out / 'pareto.png'}")
    return SweepResult(out, rows, completed, collect_seconds)


def _evaluate_together(data, to_evaluate: list[tuple], scfg: SweepConfig, base: TrainConfig) -> dict[str, dict]:
    """Evaluate the trained SAEs on the held-out text in one go (the model's clean pass shared by all of
    them); write each run's eval.json, final/ (sparsity from the held-out text) and table row."""
    _say(f"evaluating {len(to_evaluate)} SAEs together on the held-out text")
    t0 = time.perf_counter()
    saes = [sae for _, sae, _ in to_evaluate]
    evaluated = data.evaluate_many(saes, downstream=scfg.downstream) if base.eval_tokens > 0 else [{} for _ in saes]
    eval_seconds = (time.perf_counter() - t0) / len(saes)  # each SAE's share of the shared evaluation
    rows = {}
    for (point, sae, trained), metrics in zip(to_evaluate, evaluated):
        run_dir = Path(point.cfg.out)
        metrics.pop("error_by_position", None)
        if "firing_frequency" in metrics:
            sae.save(run_dir / "final", sparsity=torch.log10(metrics.pop("firing_frequency") + 1e-10),
                     runner_cfg=asdict(point.cfg))
        (run_dir / "eval.json").write_text(json.dumps(
            {**metrics, "train_tokens": trained["train_tokens"], "train_seconds": round(trained["train_seconds"], 1)},
            indent=2))
        row = {"architecture": point.architecture, "sparsity_setting": point.label,
               "l0": metrics.get("l0"), "explained_variance": metrics.get("explained_variance"),
               "ce_loss_score": metrics.get("ce_loss_score"), "kl_score": metrics.get("kl_score"),
               "dead_fraction": trained["dead_fraction"], "eval_dead_fraction": metrics.get("dead_fraction"),
               "train_seconds": trained["train_seconds"], "eval_seconds": eval_seconds,
               "wall_seconds": trained["train_seconds"] + eval_seconds, "dead_latent_remedy": point.cfg.remedy,
               "run": point.name}
        (run_dir / ROW_FILE).write_text(json.dumps({"config": asdict(point.cfg), "row": row}, indent=2))
        rows[point.name] = row
        _say(f"  {point.name}: L0 {_num(row['l0'])}, explained variance {_num(row['explained_variance'])}, "
             f"CE recovered {_num(row['ce_loss_score'])}, dead {row['dead_fraction']:.3f}")
    return rows


def _saved_for(path: Path, cfg: TrainConfig, key: str):
    """``key`` of the JSON file at ``path`` when it was written for this very config, else None."""
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    return saved[key] if saved.get("config") == json.loads(json.dumps(asdict(cfg))) else None


def write_table(rows: list[dict], csv_path, md_path) -> None:
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "" if row.get(key) is None else row[key] for key in COLUMNS})
    headers = ("architecture", "sparsity setting", "L0", "explained variance", "CE-loss recovered", "KL recovered",
               "dead fraction", "dead on eval", "train s", "eval s", "wall s", "remedy", "run")
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        cells = [row["architecture"], row["sparsity_setting"], _num(row["l0"], 2), _num(row["explained_variance"]),
                 _num(row["ce_loss_score"]), _num(row["kl_score"]), _num(row["dead_fraction"]),
                 _num(row["eval_dead_fraction"]), _num(row["train_seconds"], 1), _num(row["eval_seconds"], 1),
                 _num(row["wall_seconds"], 1), row["dead_latent_remedy"], row["run"]]
        lines.append("| " + " | ".join(cells) + " |")
    Path(md_path).write_text("\n".join(lines) + "\n\nL0 and explained variance (1 - FVU) on held-out text; "
                             "CE-loss recovered = (CE zero-ablated - CE with the SAE) / (CE zero-ablated - clean CE); "
                             "dead fraction = latents silent over the last dead window of training; "
                             "dead on eval = never active on the held-out text.\n")


def plot_pareto(rows: list[dict], path, title: str = "") -> Path:
    """Explained variance against L0 (log scale), one line per architecture; CE-loss recovered beside it
    when measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    panels = [("explained_variance", "explained variance")]
    if any(row.get("ce_loss_score") is not None for row in rows):
        panels.append(("ce_loss_score", "CE-loss recovered"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
    architectures = list(dict.fromkeys(row["architecture"] for row in rows))
    for ax, (key, label) in zip(axes[0], panels):
        for arch in architectures:
            points = sorted((row["l0"], row[key], row["sparsity_setting"]) for row in rows
                            if row["architecture"] == arch and _finite(row.get("l0")) and row["l0"] > 0
                            and _finite(row.get(key)))
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
    fig.suptitle(f"{title}\npoints labelled with k (TopK family), target L0 (jumprelu) or L1 coefficient "
                 "(standard, gated)".strip())
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _split(text: str) -> list[str]:
    return [item.strip() for item in str(text).split(",") if item.strip()]


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _num(value, digits: int = 4) -> str:
    return "n/a" if value is None or not _finite(value) else f"{value:.{digits}f}"


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _say(message: str) -> None:
    print(f"saelab: {message}", file=sys.stderr, flush=True)
