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
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from saelab.data.sources import TrainingData
from saelab.evals.absorption import DEFAULT_WORDS as ABSORPTION_WORDS, absorption_metrics, letter_probes, spelling_set
from saelab.evals.geometry import decoder_geometry
from saelab.evals.probing import BUILTIN_TASKS, DEFAULT_EXAMPLES as PROBE_EXAMPLES, probing_metrics
from saelab.evals.held_out import evaluate_held_out
from saelab.files import folder_lock, read_json, write_json
from saelab.log import say
from saelab.options import option, parse_list, type_name
from saelab.sae import Architecture, all_architectures, architecture, load_sae, settings_fields
from saelab.training.config import TrainConfig
from saelab.training.plots import finite, plot_pareto
from saelab.training.config import format_value, sparsity_label
from saelab.training.run import load_run_config, save_evaluated, train
from saelab.training.trainer import has_checkpoint

ROW_FILE = "sweep_row.json"      # a grid point trained and evaluated: its table row
TRAINED_FILE = "trained.json"   # a grid point trained, its evaluation still to come
# The results table: (column, its header in results.md, digits shown there; None: as it is).
TABLE = (("architecture", "architecture", None), ("sparsity_setting", "sparsity setting", None), ("l0", "L0", 2),
         ("explained_variance", "explained variance", 4), ("ce_loss_score", "CE-loss recovered", 4),
         ("kl_score", "KL recovered", 4), ("dead_fraction", "dead fraction", 4),
         ("eval_dead_fraction", "dead on eval", 4), ("train_seconds", "train s", 1), ("eval_seconds", "eval s", 1),
         ("wall_seconds", "wall s", 1), ("dead_latent_remedy", "remedy", None), ("run", "run", None))
COLUMNS = tuple(column for column, _, _ in TABLE)
# On synthetic data (--synthetic): the scores against the true features, after explained variance.
GEOMETRY_TABLE = (("max_decoder_cosine_mean", "max decoder cos", 3), ("near_duplicate_latents", "near-duplicates", 0),
                  ("encoder_decoder_cosine_mean", "enc/dec cos", 3))
# --suite absorption and probing (means over the letters and over the built-in probing tasks).
ABSORPTION_TABLE = (("mean_absorption_fraction_score", "absorption", 4), ("mean_full_absorption_score",
                    "full absorption", 4), ("mean_num_split_features", "split features", 2))
PROBING_TABLE = (("sae_top_1_test_accuracy", "probe top-1", 4), ("sae_top_5_test_accuracy", "probe top-5", 4))
SUITE_TABLES = {"geometry": GEOMETRY_TABLE, "absorption": ABSORPTION_TABLE, "probing": PROBING_TABLE}
GROUND_TRUTH_TABLE = (("mcc", "MCC", 4), ("f1", "F1", 4), ("uniqueness", "uniqueness", 4), ("true_l0", "true L0", 2),
                      ("shrinkage", "shrinkage", 4))


@dataclass
class SweepConfig:
    architectures: str | None = option(None, "Architectures to train, comma-separated, each at every value of the "
                                       "setting that sets its sparsity (see above; default: every architecture "
                                       "that sweeps by default).", replaces=("architecture",))
    values: dict = option(dict, "The sparsity settings to try, by setting name, e.g. {'k': '16,32', "
                          "'l1_coefficient': [2, 5]} (the command line: --k 16,32 --l1-coefficient 2,5).")
    out: str = option("runs/sweep", "Sweep folder: results.csv, results.md, pareto.png, sweep.json and one "
                      "run folder per grid point.")
    activation_tokens: int | None = option(None, "Training activations collected from the model once and "
                                           "shared by every run (default: --tokens, or the whole corpus when "
                                           "smaller; runs repeat them in epochs). Memory = this x d_in x 4 bytes. "
                                           "Not with --activations: a cache is read from disk as it is.",
                                           positive=True)
    downstream: bool = option(True, "Also measure CE-loss and KL recovered with each SAE spliced into the "
                              "model on the held-out text (--no-downstream: reconstruction metrics only).")
    suite: str = option("core", "Evaluations whose figures become columns (and Pareto panels), comma-separated: "
                        "core (always); geometry (mean max decoder cosine, near-duplicate latents, encoder/decoder "
                        "cosine); absorption (first-letter absorption fraction, full absorption rate, split "
                        "features: `saelab eval --suite absorption` at its defaults, the prompts run once for all "
                        "SAEs); probing (top-1 and top-5 sparse-probing accuracy, mean over the built-in tasks, "
                        "one model pass for all SAEs). Synthetic data always adds its ground-truth scores. "
                        "Finished grid points get the columns they lack without retraining.")

    def __post_init__(self):
        unknown = set(parse_list(self.suite)) - {"core", *SUITE_TABLES}
        if unknown:
            raise ValueError(f"invalid sweep config: --suite {', '.join(sorted(unknown))}: the sweep's suites are "
                             f"core, {', '.join(SUITE_TABLES)}")
        try:
            names = (parse_list(self.architectures) if self.architectures is not None
                     else [arch.name for arch in all_architectures() if arch.in_default_sweep])
            self.architectures = ",".join(architecture(name).name for name in names)
            swept = {arch.sparsity for arch in self.grid_architectures if arch.sparsity}
            for name, values in self.values.items():
                if name not in swept:
                    raise ValueError(f"{name} is not the sparsity setting of any of {self.architectures}")
                text = values if isinstance(values, str) else ",".join(map(str, values))
                self.values[name] = _positive(parse_list(text, _kind(name)))
        except ValueError as err:
            raise ValueError(f"invalid sweep config: {err}") from None

    @property
    def grid_architectures(self) -> list[Architecture]:
        return [architecture(name) for name in parse_list(self.architectures)]

    def values_for(self, arch: Architecture) -> list:
        """The values of ``arch``'s sparsity setting this sweep trains it at ([None]: it has none)."""
        if not arch.sparsity:
            return [None]
        return self.values.get(arch.sparsity) or parse_list(arch.sweep_values, _kind(arch.sparsity))


@dataclass
class GridPoint:
    architecture: str
    setting: str | None     # the settings field set, e.g. "k"
    value: float | int | None
    cfg: TrainConfig

    @property
    def label(self) -> str:
        return "default" if self.setting is None else f"{self.setting}={format_value(self.value)}"

    @property
    def name(self) -> str:
        return sparsity_label(self.cfg)


@dataclass
class SweepResult:
    out: Path
    rows: list[dict]          # one per grid point trained (or reused), in grid order
    completed: bool           # False when stopped early (Ctrl-C): run the same command again to continue
    collect_seconds: float    # the one pass of the model over the training text (0 when nothing was trained)


def grid(scfg: SweepConfig, base: TrainConfig) -> list[GridPoint]:
    """Every (architecture, sparsity value) pair, each with its full TrainConfig (validated)."""
    points = []
    for arch in scfg.grid_architectures:
        for value in scfg.values_for(arch):
            given = {} if value is None else {arch.sparsity: value}
            cfg = replace(base, architecture=arch.name, **given, dead_latent_remedy=_remedy_for(base, arch))
            cfg = replace(cfg, out=str(Path(scfg.out) / sparsity_label(cfg)))
            points.append(GridPoint(arch.name, arch.sparsity, value, cfg))
    return points


def base_config(scfg: SweepConfig, **given) -> TrainConfig:
    """The TrainConfig shared by every grid point, from the given fields. Its own architecture is a
    placeholder (each point sets its own): the first listed that takes the chosen dead-latent remedy."""
    remedy = given.get("dead_latent_remedy", "auto")
    fitting = [arch for arch in scfg.grid_architectures if arch.accepts_remedy(remedy)]
    if not fitting:
        takes = [arch.name for arch in all_architectures() if arch.accepts_remedy(remedy)]
        raise ValueError(f"dead_latent_remedy {remedy} applies to {', '.join(takes)}, none of which is in "
                         f"architectures ({scfg.architectures})")
    return TrainConfig(**{**given, "architecture": fitting[0].name})


def _remedy_for(base: TrainConfig, arch: Architecture) -> str:
    """The base remedy where the architecture takes it; auto where it does not (auxk only suits the TopK
    family, ghost grads only standard SAEs), so one sweep can mix architectures."""
    return base.dead_latent_remedy if arch.accepts_remedy(base.dead_latent_remedy) else "auto"


def sweep(scfg: SweepConfig, base: TrainConfig, overwrite: bool = False) -> SweepResult:
    """Train every grid point together on the same activations (collected from the model once, or read
    from a cache), evaluate them together, and write results.csv, results.md, pareto.png and sweep.json."""
    with folder_lock(scfg.out, "sweep"):
        return _sweep(scfg, base, overwrite)


def _sweep(scfg: SweepConfig, base: TrainConfig, overwrite: bool) -> SweepResult:
    out = Path(scfg.out)
    if base.activations is not None and scfg.activation_tokens is not None:
        raise ValueError("--activation-tokens sets how many activations to collect from the model; with "
                         "--activations the cache is used as it is (write a smaller one with `saelab cache --tokens`)")
    torch.manual_seed(base.seed)
    data = TrainingData(base, base.hooks)
    base = data.fixed(base)
    if data.synthetic is not None and {"absorption", "probing"} & set(parse_list(scfg.suite)):
        raise ValueError("--suite absorption and probing run prompts through the language model; synthetic data "
                         "has none (its ground-truth scores are always measured)")
    points = grid(scfg, base)
    rows: dict[str, dict] = {}          # grid point name -> its table row
    to_evaluate: list[tuple] = []       # (point, sae, training figures): trained, evaluated together at the end
    to_train: list[GridPoint] = []
    for point in points:
        run_dir = Path(point.cfg.out)
        reused = None if overwrite else _saved_for(run_dir / ROW_FILE, point.cfg, "row")
        trained = None if overwrite or reused else _saved_for(run_dir / TRAINED_FILE, point.cfg, "trained")
        if reused is not None:
            rows[point.name] = reused
        elif trained is not None:
            to_evaluate.append((point, load_sae(run_dir / "final"), trained))
        else:
            to_train.append(point)
    what = "synthetic data" if data.synthetic is not None else f"{base.model} {base.hook}"
    say(f"sweep of {len(points)} SAEs on {what} into {out}: {len(rows)} finished earlier (reused), "
        f"{len(to_evaluate)} trained earlier (to evaluate), {len(to_train)} to train: "
        + ", ".join(p.name for p in to_train))
    activation_rows, collect_seconds, completed = None, 0.0, True
    if to_train:
        activation_rows, collect_seconds = data.keep_in_memory(scfg.activation_tokens or base.tokens, base.progress)
        say(f"every run trains on {activation_rows:,} activation rows of {data.described}, read once "
            f"({collect_seconds:.1f} s)")
        resume = not overwrite and all(_checkpoint_for(p) for p in to_train)
        summaries = train([p.cfg for p in to_train], resume=resume, overwrite=True, data=data, evaluate=False)
        completed = all(summary.completed for summary in summaries)
        if not completed:
            say("stopped; run the same command again to continue the sweep")
        for point, summary in zip(to_train, summaries):
            if summary.completed:  # saved now, so a sweep stopped later keeps this SAE
                write_json(Path(point.cfg.out) / TRAINED_FILE, {"config": point.cfg.as_dict(),
                                                                "trained": summary.training})
                to_evaluate.append((point, summary.sae, summary.training))
    if completed and to_evaluate:
        rows.update(_evaluate_together(data, to_evaluate, scfg, base))
    suite_seconds = _add_suite_columns(rows, points, scfg, data, base)
    rows = [rows[point.name] for point in points if point.name in rows]

    write_table(rows, out / "results.csv", out / "results.md")
    plot_pareto(rows, out / "pareto.png", title=f"synthetic: {base.synthetic}" if data.synthetic is not None
                else f"{base.model} {base.hook}")
    per_point = {"architecture", "out", "sae_settings"}
    write_json(out / "sweep.json", {
        "sweep": asdict(scfg), "shared": {k: v for k, v in asdict(base).items() if k not in per_point},
        "activation_rows": activation_rows, "collect_seconds": collect_seconds,
        "completed": completed, "suite_seconds_per_sae": suite_seconds, "rows": rows})
    say(f"results in {out / 'results.md'} (and .csv); Pareto plot in {out / 'pareto.png'}")
    return SweepResult(out, rows, completed, collect_seconds)


def _evaluate_together(data: TrainingData, to_evaluate: list[tuple], scfg: SweepConfig,
                       base: TrainConfig) -> dict[str, dict]:
    """Evaluate the trained SAEs on the held-out data in one go (the model's clean pass shared by all of
    them); write each run's eval.json, final/ (sparsity from the held-out text) and table row."""
    say(f"evaluating {len(to_evaluate)} SAEs together on the held-out text")
    t0 = time.perf_counter()
    held_out = data.held_out()
    saes = [(sae, point.cfg.hook) for point, sae, _ in to_evaluate]
    evaluated = evaluate_held_out(held_out, saes, downstream=scfg.downstream, progress=base.progress) \
        if held_out is not None else [{} for _ in saes]
    eval_seconds = (time.perf_counter() - t0) / len(saes)  # each SAE's share of the shared evaluation
    rows = {}
    for (point, sae, trained), metrics in zip(to_evaluate, evaluated):
        metrics.pop("error_by_position", None)
        save_evaluated(point.cfg, sae, metrics, trained)
        row = {"architecture": point.architecture, "sparsity_setting": point.label,
               "l0": metrics.get("l0"), "explained_variance": metrics.get("explained_variance"),
               "ce_loss_score": metrics.get("ce_loss_score"), "kl_score": metrics.get("kl_score"),
               **{key: metrics.get(key) for key, _, _ in GROUND_TRUTH_TABLE if key in metrics},
               "dead_fraction": trained["dead_fraction"], "eval_dead_fraction": metrics.get("dead_fraction"),
               "train_seconds": trained["train_seconds"], "eval_seconds": eval_seconds,
               "wall_seconds": trained["train_seconds"] + eval_seconds, "dead_latent_remedy": point.cfg.remedy,
               "run": point.name}
        write_json(Path(point.cfg.out) / ROW_FILE, {"config": point.cfg.as_dict(), "row": row})
        rows[point.name] = row
        scores = f"MCC {_num(row['mcc'])}, F1 {_num(row['f1'])}" if "mcc" in row else \
            f"CE recovered {_num(row['ce_loss_score'])}"
        say(f"  {point.name}: L0 {_num(row['l0'])}, explained variance {_num(row['explained_variance'])}, "
            f"{scores}, dead {row['dead_fraction']:.3f}")
    return rows


def _add_suite_columns(rows: dict[str, dict], points: list[GridPoint], scfg: SweepConfig, data: TrainingData,
                       base: TrainConfig) -> dict[str, float]:
    """The --suite columns for every finished grid point that lacks them (new ones, and rows from an earlier
    sweep without that suite), each suite's model work done once for all of them; the rows are saved again.
    Returns each suite's seconds per SAE."""
    seconds = {}
    for suite in (name for name in parse_list(scfg.suite) if name in SUITE_TABLES):
        table = SUITE_TABLES[suite]
        missing = [point for point in points if point.name in rows and table[0][0] not in rows[point.name]]
        if not missing:
            continue
        say(f"{suite}: {len(missing)} SAE{'s' if len(missing) > 1 else ''}")
        t0 = time.perf_counter()
        saes = [load_sae(Path(point.cfg.out) / "final") for point in missing]
        figures = SUITE_COLUMNS[suite](saes, data, base)
        seconds[suite] = (time.perf_counter() - t0) / len(missing)
        for point, found in zip(missing, figures):
            row = rows[point.name]
            row.update({key: found[key] if finite(found.get(key)) else None for key, _, _ in table})
            write_json(Path(point.cfg.out) / ROW_FILE, {"config": point.cfg.as_dict(), "row": row})
        say(f"{suite}: {seconds[suite]:.1f} s per SAE")
    return seconds


def _geometry_columns(saes, data, base) -> list[dict]:
    return [decoder_geometry(sae) for sae in saes]


def _absorption_columns(saes, data, base) -> list[dict]:
    model, tokenizer, hooks = data.language_model()
    spelling = spelling_set(model, tokenizer, hooks[base.hook], ABSORPTION_WORDS, base.seed,
                            prepend_bos=base.prepend_bos, progress=base.progress)
    probes = letter_probes(spelling)
    return [absorption_metrics(sae, spelling, probes) for sae in saes]


def _probing_columns(saes, data, base) -> list[dict]:
    model, tokenizer, hooks = data.language_model()
    results = probing_metrics(model, tokenizer, hooks[base.hook], saes, list(BUILTIN_TASKS), PROBE_EXAMPLES,
                              prepend_bos=base.prepend_bos, progress=say, seed=base.seed)
    return [result["mean"] for result in results]


SUITE_COLUMNS = {"geometry": _geometry_columns, "absorption": _absorption_columns, "probing": _probing_columns}


def _saved_for(path: Path, cfg: TrainConfig, key: str):
    """``key`` of the JSON file at ``path`` when it was written for this very config, else None."""
    if not path.exists():
        return None
    saved = read_json(path, "Delete it to train (or evaluate) that grid point again.")
    return saved[key] if saved.get("config") == json.loads(json.dumps(cfg.as_dict())) else None


def _checkpoint_for(point: GridPoint) -> bool:
    """Whether the point's folder holds a checkpoint of an interrupted run of this very config."""
    if not has_checkpoint(point.cfg.out):
        return False
    return load_run_config(point.cfg.out).as_dict() == point.cfg.as_dict()


def _kind(setting: str) -> type:
    """int or float: the type of the settings field called ``setting``."""
    return int if type_name(settings_fields()[setting][0]) == "int" else float


def write_table(rows: list[dict], csv_path, md_path) -> None:
    table = _table_for(rows)
    columns = [column for column, _, _ in table]
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "" if row.get(key) is None else row[key] for key in columns})
    lines = ["| " + " | ".join(header for _, header, _ in table) + " |", "|" + "|".join("---" for _ in table) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(row[key] if digits is None else f"{row[key]:,}" if digits == 0 and
                                       row.get(key) is not None else _num(row.get(key), digits)
                                       for key, _, digits in table) + " |")
    notes = ("L0 and explained variance (1 - FVU) on held-out text; CE-loss recovered = (CE zero-ablated - CE with "
             "the SAE) / (CE zero-ablated - clean CE); dead fraction = latents silent over the last dead window of "
             "training; dead on eval = never active on the held-out text.")
    if any(column[0] == "mcc" for column in table):
        notes += (" Against the true features of the synthetic data (evals/ground_truth.py): MCC = mean cosine of "
                  "decoder rows and true directions after optimal matching; F1 = of each matched latent's firing "
                  "against its feature's; uniqueness = distinct true features that are a live latent's best match, "
                  "per live latent; shrinkage = mean ||x_hat - b|| / ||x - b||.")
    if any(column[0] == "mean_absorption_fraction_score" for column in table):
        notes += (" First-letter absorption (evals/absorption.py, SAEBench's definition, means over the letters "
                  "whose probe reaches F1 0.6): absorption = mean absorption fraction, full absorption = share of "
                  "detected words whose main latents are silent while one other latent carries the letter, "
                  "split features = main latents per letter.")
    if any(column[0] == "sae_top_1_test_accuracy" for column in table):
        notes += (" Sparse probing (evals/probing.py): test accuracy of a probe on the top 1 / 5 latents, mean over "
                  "the built-in tasks (" + ", ".join(BUILTIN_TASKS) + ").")
    if any(column[0] == "near_duplicate_latents" for column in table):
        notes += (" Geometry (evals/geometry.py): max decoder cos = each latent's largest decoder cosine with another, "
                  "averaged; near-duplicates = latents whose largest is above 0.9; enc/dec cos = mean cosine of a "
                  "latent's encoder column and decoder row.")
    Path(md_path).write_text("\n".join(lines) + "\n\n" + notes + "\n")


def _table_for(rows: list[dict]) -> tuple:
    """The table's columns: the ground-truth ones after explained variance when some row has them; CE and KL
    recovered only when some row measured them (not on synthetic data, nor with --no-downstream)."""
    downstream = {"ce_loss_score", "kl_score"}
    table = TABLE if any(row.get(key) is not None for row in rows for key in downstream) else \
        tuple(column for column in TABLE if column[0] not in downstream)
    at = [column for column, _, _ in table].index("explained_variance") + 1
    extra = tuple(part for part in (GROUND_TRUTH_TABLE, *SUITE_TABLES.values())
                  if any(part[0][0] in row for row in rows))
    return table[:at] + sum(extra, ()) + table[at:]


def _positive(values: list) -> list:
    if not all(value > 0 for value in values):
        raise ValueError(f"sweep values must be positive, got {values}")
    return values


def _num(value, digits: int = 4) -> str:
    return "n/a" if value is None or not finite(value) else f"{value:.{digits}f}"
