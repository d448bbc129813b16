"""The command line: one config dataclass per command, its fields' help texts as ``--help`` and their
declared roles (``saelab.options``) as the rules: which options take comma lists, which a sweep replaces.
The CLI holds no field lists of its own and no logic a Python user would miss."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from saelab.evals.options import SAEOptions
from saelab.log import say
from saelab.options import default_of, help_text, type_name
from saelab.sae import settings_fields
from saelab.training.config import TrainConfig

TYPES = {"int": int, "float": float, "str": str}
LIST_NOTE = " Comma-separated values: one SAE per combination (see above)."


def option_fields(config_class) -> list[dataclasses.Field]:
    """The fields of ``config_class`` the command line offers; for TrainConfig also every registered
    architecture's settings (one option per name, its help saying which architectures take it)."""
    found = [f for f in dataclasses.fields(config_class) if type_name(f) in (*TYPES, "bool")]
    if issubclass(config_class, TrainConfig):
        for f, architectures in settings_fields().values():
            found.append(_settings_field(f, architectures))
    return found


def _settings_field(f: dataclasses.Field, architectures: list[str]) -> dataclasses.Field:
    field = dataclasses.field(default=f.default, metadata={**f.metadata, "help": f"{', '.join(architectures)}: "
                                                          f"{help_text(f)}"})
    field.name, field.type = f.name, f.type
    return field


def add_options(parser: argparse.ArgumentParser, fields: list[dataclasses.Field], lists=(), skip=()) -> None:
    """An option per field (a positional argument where the field says so); ``lists``: the fields that take
    comma-separated values."""
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f in fields:
        if f.name in skip:
            continue
        text = help_text(f).replace("%", "%%")  # argparse treats help strings as %-format templates
        kind, meta = type_name(f), f.metadata
        if meta.get("exclusive") and meta["exclusive"] not in groups:
            groups[meta["exclusive"]] = parser.add_mutually_exclusive_group()
        place = groups[meta["exclusive"]] if meta.get("exclusive") else parser
        if meta.get("positional"):
            parser.add_argument(f.name, metavar=meta.get("metavar") or f.name.upper(), help=text)
            continue
        flags = ["--" + f.name.replace("_", "-"), *meta.get("aliases", ())]
        default = default_of(f)
        shown = "required" if default is dataclasses.MISSING else f"default: {default}"
        if kind == "bool":
            place.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=f"{text} ({shown})")
        elif f.name in lists:
            place.add_argument(*flags, dest=f.name, default=None, metavar=f"{kind.upper()}[,{kind.upper()}...]",
                               help=f"{text}{LIST_NOTE} ({shown})")
        else:
            place.add_argument(*flags, dest=f.name, type=TYPES[kind], default=None, choices=meta.get("choices"),
                               nargs=meta.get("nargs"),
                               metavar=meta.get("metavar") or (None if meta.get("choices") else kind.upper()),
                               required=default is dataclasses.MISSING, help=f"{text} ({shown})")


def given(args: argparse.Namespace, fields: list[dataclasses.Field], skip=()) -> dict:
    """The options of ``fields`` given on the command line, by field name."""
    return {f.name: getattr(args, f.name) for f in fields
            if f.name not in skip and getattr(args, f.name, None) is not None}


def read_lists(args: argparse.Namespace, fields: list[dataclasses.Field], names) -> dict[str, list]:
    """Read the comma-list options ``names``: a single value is put back into ``args`` with its field's type;
    the options given several values are returned, name -> typed values."""
    from saelab.options import parse_list

    lists = {}
    for f in fields:
        if f.name in names and getattr(args, f.name, None) is not None:
            values = parse_list(getattr(args, f.name), TYPES[type_name(f)])
            if len(values) > 1:
                lists[f.name] = values
            setattr(args, f.name, values[0] if len(values) == 1 else None)
    return lists


def config_from_args(config_class, args: argparse.Namespace):
    return config_class(**given(args, option_fields(config_class)))


def build_parser() -> argparse.ArgumentParser:
    from saelab.training.config import list_fields
    from saelab.training.sweep import SweepConfig

    parser = argparse.ArgumentParser(prog="saelab", description="Train, evaluate and read sparse autoencoders "
                                     "on language-model activations.")
    parser.add_argument("--debug", action="store_true", help="on an error, show Python's traceback too (by "
                        "default saelab prints one line: what is wrong and what to do)")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train an SAE on a model's activations, then evaluate it",
                                description="Train an SAE on one hook point of a language model, evaluate it "
                                "on held-out text and save it in the SAELens folder format. With no options: "
                                "a TopK SAE on SmolLM2-135M's residual stream after block 6, in runs/demo. "
                                "Comma-separated values of "
                                + ", ".join("--" + name.replace("_", "-") for name in list_fields())
                                + " train one SAE per combination in one run, all fed by one forward pass per batch "
                                "(stopped after the deepest hook), each in its own run folder under --out (e.g. "
                                "OUT/blocks.6.hook_resid_post-topk-k32); the other options are shared; --resume OUT "
                                "resumes them all.")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its checkpoint "
                       "(other options are taken from the run)")
    train.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    train.add_argument("--layers", metavar="BLOCKS", help="one dictionary per block, e.g. 0-11 or 0,3,6: --hook "
                       "(default: the kind's, blocks.6.hook_resid_post for an SAE, blocks.6.ln2.hook_normalized for a "
                       "transcoder) moved to each of these blocks, all trained on one forward pass; with --kind "
                       "crosscoder, one crosscoder over the hook at these blocks")
    add_options(train, option_fields(TrainConfig), lists=list_fields())

    sweep = commands.add_parser(
        "sweep", help="train a grid of SAEs (architectures x sparsity) on the same activations; Pareto plot",
        description="Train every architecture in --architectures at each value of the setting that sets its "
        "sparsity (" + "; ".join(f"{a.name}: --{a.sparsity.replace('_', '-')}, default {a.sweep_values}"
                                 for a in _sweepable()) + ") on one hook point. The training "
        "activations are collected from the model once, held in memory and shared by every run (with "
        "--activations: read from a `saelab cache` folder instead, without the model); the SAEs train together "
        "and are evaluated together on the same held-out text. Writes results.csv, results.md (architecture, "
        "sparsity setting, L0, explained variance, CE-loss recovered, dead fraction, wall time), pareto.png "
        "(explained variance against L0, one line per architecture) and one run folder per grid point into --out; "
        "running the same command again reuses finished runs. The other options apply to every run.")
    sweep.add_argument("--overwrite", action="store_true", help="retrain grid points whose run folder already "
                       "holds a finished run with the same config (default: reuse them)")
    add_options(sweep, option_fields(SweepConfig))
    add_options(sweep, option_fields(TrainConfig), lists=_swept_settings(), skip=_replaced_by(SweepConfig))

    from saelab.data.cache import CacheConfig

    cache = commands.add_parser(
        "cache", help="write a model's activations at hook points to disk once; train on them without the model",
        description="Run the model over --tokens tokens of text and write the activations of every hook point in "
        "--hooks (one forward pass per batch, stopped after the deepest hook) to sharded, memory-mapped .npy "
        "files in --out, with the token ids and metadata.json. Text is read and packed with the same options as "
        "`saelab train` (special tokens are not stored), in the same forward batches, so `saelab train "
        "--activations OUT` and `saelab sweep --activations OUT` train on exactly the rows a run on the model "
        "would, without loading the model. Running the same command again continues an interrupted write; a "
        "cache written with another config is refused.")
    cache.add_argument("--overwrite", action="store_true", help="replace a cache already in --out (default: "
                       "continue it when written with the same config, refuse otherwise)")
    add_options(cache, option_fields(CacheConfig))

    from saelab.data.synthetic import PRESETS, SyntheticConfig

    synth = commands.add_parser(
        "synth", help="write a synthetic-data config: activations made of known features, to score SAEs against",
        description="Write a JSON config of synthetic activations: --n-features unit directions in --d-in "
        "dimensions, Zipf-distributed firing, log-normal magnitudes, optional hierarchy (children fire only with "
        "their parent, siblings exclusively) and low-rank correlations. `saelab train --synthetic CONFIG` and "
        "`saelab sweep --synthetic CONFIG` train on samples generated from it (deterministic from its seed, one "
        "unit at a time, never stored) and score each SAE against the true features: MCC, F1 of firing, "
        "uniqueness, explained variance, L0 vs the true L0, shrinkage. Prints what the data looks like.")
    synth.add_argument("--out", default="synthetic.json", help="the config file to write (default: synthetic.json)")
    synth.add_argument("--preset", choices=sorted(PRESETS), help="start from a named configuration (options given "
                       "override its values); synth-16k is SAELens's SynthSAEBench-16k size: 16,384 features in 768 "
                       "dimensions at L0 about 25")
    add_options(synth, option_fields(SyntheticConfig))

    from saelab.models.options import ModelOptions

    hooks = commands.add_parser("hooks", help="list the hook point names a model supports")
    add_options(hooks, option_fields(ModelOptions))

    from saelab.evals import EvalConfig

    ev = commands.add_parser(
        "eval", help="evaluate an SAE folder on held-out text and write a report",
        description="Evaluate an SAE (a saelab or SAELens folder) on text: L0, FVU, cosine, CE/KL with the SAE "
        "spliced in vs zero-ablation, dead/dense latents. Prints a table (or JSON with --json) and writes a "
        "report folder: metrics.json, summary.md, density_histogram.png, error_by_position.png.")
    add_options(ev, option_fields(EvalConfig))
    ev.add_argument("--json", action="store_true", help="print the report as one JSON object on stdout "
                    "instead of the table")
    _add_analysis_commands(commands)
    _add_interop_commands(commands)
    return parser


def add_sae_and_model_options(parser: argparse.ArgumentParser) -> None:
    """SAE_FOLDER, --model, --hook, --device: how every command that reads an SAE finds it and its model."""
    add_options(parser, option_fields(SAEOptions))


def _sweepable():
    from saelab.sae import all_architectures

    return [arch for arch in all_architectures() if arch.sparsity]


def _swept_settings() -> tuple[str, ...]:
    return tuple(dict.fromkeys(arch.sparsity for arch in _sweepable()))


def _replaced_by(config_class) -> set[str]:
    """TrainConfig fields a sweep offers in its own form: those SweepConfig declares too, or says it replaces."""
    names = set()
    for f in dataclasses.fields(config_class):
        names.add(f.name)
        names.update(f.metadata.get("replaces", ()))
    return names


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, OSError, RuntimeError) as err:  # bad input, a bad file: one line, unless --debug
        if args.debug:
            raise
        print(f"saelab {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        from saelab.distributed import release_process_group

        release_process_group()  # under torchrun (`torchrun ... -m saelab train`): leave the group cleanly


def _train(args) -> int:
    from saelab.training.config import expand, list_fields
    from saelab.training.run import resume_configs, train

    from saelab.models.hooks import HOOK_LIST_SEPARATOR, split_hook_list
    from saelab.training.config import DEFAULT_HOOK, layer_hooks

    fields = option_fields(TrainConfig)
    lists = read_lists(args, fields, list_fields())
    from saelab.sae.config import KINDS

    multi_hook = args.kind is not None and KINDS[args.kind].multi_hook  # a crosscoder or CLT: one over all hooks
    if args.layers is not None:
        if "hook" in lists:
            raise ValueError("--layers moves one --hook to several blocks; give one --hook with it, not a list")
        hooks = layer_hooks(args.layers, split_hook_list(args.hook or DEFAULT_HOOK[args.kind or "sae"])[0])
        if multi_hook:  # one dictionary over those blocks
            args.hook = HOOK_LIST_SEPARATOR.join(hooks)
        else:
            lists["hook"], args.hook = hooks, None
    elif multi_hook and "hook" in lists:  # --kind crosscoder --hook a,b,c: one crosscoder over a, b and c
        args.hook = HOOK_LIST_SEPARATOR.join(lists.pop("hook"))
    if args.resume and lists:
        raise ValueError(f"--resume takes the SAEs of the run; drop the lists given to {', '.join(lists)}")
    if args.resume:
        summaries = train(resume_configs(args.resume, **given(args, fields)), resume=True, root=args.resume)
    else:
        if "hook" not in lists:
            _hook_from_cache(args)
        base = TrainConfig(**given(args, fields))
        if lists:
            summaries = train(expand(base, lists), overwrite=args.overwrite, root=base.out)
        else:
            summaries = train([base], overwrite=args.overwrite)
    return 0 if all(summary.completed for summary in summaries) else 130


def _sweep(args) -> int:
    from saelab.training.sweep import SweepConfig, base_config, sweep

    fields = option_fields(TrainConfig)
    swept = _swept_settings()
    values = {name: getattr(args, name) for name in swept if getattr(args, name, None) is not None}
    scfg = SweepConfig(**given(args, option_fields(SweepConfig)), values=values)
    _hook_from_cache(args)
    result = sweep(scfg, base_config(scfg, **given(args, fields, skip={*swept, *_replaced_by(SweepConfig)})),
                   overwrite=args.overwrite)
    print((result.out / "results.md").read_text(), end="")
    return 0 if result.completed else 130


def _hook_from_cache(args) -> None:
    """With --activations and no --hook: the cache's only hook (an error lists them when it holds several);
    with --synthetic: the name ``synthetic``."""
    if getattr(args, "synthetic", None) is not None and args.hook is None:
        args.hook = "synthetic"
    if args.activations is not None and args.hook is None:
        from saelab.data.cache import ActivationCache

        args.hook = ActivationCache(args.activations).only_hook()


def _cache(args) -> int:
    from saelab.data.cache import CacheConfig, write_cache

    try:
        write_cache(config_from_args(CacheConfig, args), overwrite=args.overwrite)
    except KeyboardInterrupt:
        print("saelab cache: interrupted; finished shards are kept. Run the same command again to continue.",
              file=sys.stderr)
        return 130
    return 0


def _synth(args) -> int:
    from dataclasses import replace

    from saelab.data.synthetic import PRESETS, SyntheticConfig, describe

    chosen = given(args, option_fields(SyntheticConfig))
    cfg = replace(PRESETS[args.preset], **chosen) if args.preset else SyntheticConfig(**chosen)
    cfg.save(args.out)
    print(describe(cfg))
    say(f"config written to {args.out}; train on it with `saelab train --synthetic {args.out}` or compare "
        f"architectures with `saelab sweep --synthetic {args.out}`")
    return 0


def _hooks(args) -> int:
    from saelab.models import hook_names, load_model
    from saelab.models.options import ModelOptions

    cfg = config_from_args(ModelOptions, args)
    model, _ = load_model(cfg.model, device=cfg.device or "cpu")
    for name in hook_names(model):
        print(name)
    return 0


def _eval(args) -> int:
    import json

    from saelab.evals import EvalConfig, format_table, run_eval
    from saelab.evals.report import report_json

    cfg = config_from_args(EvalConfig, args)

    result = run_eval(cfg, progress=sys.stderr.isatty(), say=say)
    if args.json:
        print(json.dumps(report_json(result.metrics, result.info)))
    else:
        print(format_table(result.metrics, title=f"{result.info['model']} {result.info['hook']} on "
                           f"{result.info['dataset']} ({result.metrics['tokens']:,} tokens):"))
        if "geometry" in result.metrics:
            from saelab.evals.geometry import GEOMETRY_KEYS

            geometry = result.metrics["geometry"]
            print(format_table(geometry, title="geometry:", keys=GEOMETRY_KEYS))
            if "frequency_buckets" in geometry:
                print("  latents by firing frequency: " + ", ".join(
                    f"{name} {count:,}" for name, count in geometry["frequency_buckets"].items()))
        if "probing" in result.metrics:
            from saelab.evals.report import probing_markdown

            print("sparse probing (test accuracy):\n" + probing_markdown(result.metrics["probing"]))
        if "absorption" in result.metrics:
            from saelab.evals.report import ABSORPTION_KEYS

            print(format_table(result.metrics["absorption"], title="first-letter absorption (per letter in "
                               "summary.md):", keys=ABSORPTION_KEYS))
    if result.info.get("neuronpedia") and not args.json:
        print(f"Neuronpedia: {result.info['neuronpedia']}")
    say(f"report written to {result.report_dir}")
    return 0


# --- reading features (saelab.analysis) ------------------------------------------------------------------
def _add_analysis_commands(commands) -> None:
    from saelab.analysis.attribution import AttributeConfig
    from saelab.analysis.steering import SteerConfig
    from saelab.analysis.token_features import FeaturesConfig

    feats = commands.add_parser(
        "features", help="the top features on each token of a text, or the tokens a feature promotes",
        description="With --text: run the model on the text (BOS first when the SAE was trained so) and print, "
        "per token, the most active SAE features and their activations. With --logits F: print the 10 tokens "
        "whose logits feature F's decoder direction raises most and lowers most, through the model's final norm "
        "(its weight as a diagonal scale: the norm linearised) and the unembedding.")
    add_sae_and_model_options(feats)
    add_options(feats, option_fields(FeaturesConfig))

    steer = commands.add_parser(
        "steer", help="greedy generation with and without a feature's direction added (or clamped)",
        description="Generate greedily from --prompt twice and print the continuations side by side: plain, and "
        "with --strength x W_dec[feature] added to the hook's activation at every position, or, with --clamp, "
        "with the feature's activation set to VALUE at every position (the SAE spliced in with its error term, so "
        "nothing else changes).")
    add_sae_and_model_options(steer)
    add_options(steer, option_fields(SteerConfig))

    attr = commands.add_parser(
        "attribute", help="which features push a target token's logit at the end of a prompt",
        description="Split the direct contribution of the hook activation at the prompt's last position to the "
        "target token's logit (through the final norm, its 1/RMS scale frozen at this forward pass, and the "
        "unembedding; later layers' reactions not included) into one part per SAE feature "
        "(activation x decoder direction . target direction), the SAE's b_dec and its reconstruction error. The "
        "parts sum to that total; prints the total, the parts and the top positive and negative features.")
    add_sae_and_model_options(attr)
    add_options(attr, option_fields(AttributeConfig))

    from saelab.analysis.dashboard import DashboardConfig

    dash = commands.add_parser(
        "dashboard", help="a static site with a page per feature: top contexts, histogram, logit effects",
        description="Read --tokens tokens of --dataset through the model and the SAE once, collecting per feature "
        "its frequency, mean and max activation, top-activating contexts, an activation histogram and contexts "
        "sampled from each activation band; compute the tokens each decoder direction promotes and suppresses; "
        "write a static site (index.html: a sortable, searchable table of features and the SAE's evaluation; "
        "feature.html#F: one feature's page) and print the path of index.html. Open it in a browser: no "
        "server, no network.")
    add_sae_and_model_options(dash)
    add_options(dash, option_fields(DashboardConfig))

    from saelab.analysis.autointerp import ExplainConfig, ScoreConfig

    explain = commands.add_parser(
        "explain", help="an explanation of each feature, written by a local model or a server",
        description="Collect each feature's examples in one pass over --tokens tokens of --dataset (or read them "
        "from a dashboard folder): top-activating snippets, snippets sampled across activation bands, random "
        "contexts and near misses (where the features with the closest decoder directions fire and this one does "
        "not). Show the explainer the top snippets of even rank, the active tokens marked <<like this>> with "
        "their activation on a 1-10 scale, and keep its one-phrase answer. Writes explanations.jsonl (and the "
        "held-out snippets `saelab score` tests, in autointerp/examples.jsonl) into the run folder; every model "
        "answer is cached in autointerp/calls.jsonl, so an interrupted run continues where it stopped.")
    add_options(explain, option_fields(ExplainConfig))

    scorer = commands.add_parser(
        "score", help="detection and fuzzing scores of the explanations, against two baselines",
        description="Ask the scorer one yes/no question per held-out snippet. Detection: does the feature, as "
        "explained, fire in this text (its activating snippets and as many near misses and random contexts)? "
        "Fuzzing: are the marked tokens of this activating snippet the ones it fires on (half truly active, half "
        "chosen at random among the silent ones)? Per feature: balanced accuracy, precision, recall, F1 and the "
        "AUC of P(yes), for the explanation and for two baselines (another feature's explanation, and the "
        "feature's most frequent active tokens). Writes scores.jsonl and scores_summary.json and prints the "
        "means; `saelab dashboard` shows them on the feature pages.")
    add_options(scorer, option_fields(ScoreConfig))


def _explain(args) -> int:
    from saelab.analysis.autointerp import ExplainConfig, explain

    print(explain(config_from_args(ExplainConfig, args), say=say, progress=sys.stderr.isatty()))
    return 0


def _score(args) -> int:
    import json

    from saelab.analysis.autointerp import ScoreConfig, format_summary, score
    from saelab.analysis.autointerp.results import SUMMARY_FILE

    path = score(config_from_args(ScoreConfig, args), say=say, progress=sys.stderr.isatty())
    print(format_summary(json.loads((path.parent / SUMMARY_FILE).read_text())))
    print(path)
    return 0


def _analysis_load(args):
    from saelab.analysis import load_sae_and_model

    where = config_from_args(SAEOptions, args)
    return load_sae_and_model(where.sae, model=where.model, hook=where.hook, device=where.device,
                              say=say)


def _features(args) -> int:
    from saelab.analysis import (check_feature, format_logit_effects, format_token_features, logit_effects,
                                 token_features)
    from saelab.analysis.token_features import FeaturesConfig

    cfg = config_from_args(FeaturesConfig, args)
    for feature in cfg.logits or []:  # check indices before loading the model
        check_feature(_sae_alone(args), feature)
    loaded = _analysis_load(args)
    blocks = []
    if cfg.text is not None:
        rows = token_features(loaded, cfg.text, top=cfg.top)
        blocks.append(format_token_features(rows, include_special=cfg.include_special_tokens))
    for feature in cfg.logits or []:
        blocks.append(format_logit_effects(logit_effects(loaded.model, loaded.tokenizer, loaded.sae, feature,
                                                         n=cfg.logit_tokens)))
    print("\n\n".join(blocks))
    return 0


def _steer(args) -> int:
    from saelab.analysis import check_feature, format_steering, steer
    from saelab.analysis.steering import SteerConfig

    cfg = config_from_args(SteerConfig, args)
    check_feature(_sae_alone(args), cfg.feature)  # before loading the model
    result = steer(_analysis_load(args), cfg.prompt, cfg.feature, strength=cfg.strength, clamp=cfg.clamp,
                   max_new_tokens=cfg.max_new_tokens)
    print(format_steering(result))
    return 0


def _attribute(args) -> int:
    from saelab.analysis import attribute, format_attribution
    from saelab.analysis.attribution import AttributeConfig

    cfg = config_from_args(AttributeConfig, args)
    print(format_attribution(attribute(_analysis_load(args), cfg.prompt, cfg.target), n=cfg.top))
    return 0


def _sae_alone(args):
    """The SAE of SAE_FOLDER without its model (to check what it takes before the model loads)."""
    from saelab.evals.loading import find_sae_folder
    from saelab.sae import SAE

    return SAE.load(find_sae_folder(args.sae))


def _dashboard(args) -> int:
    from saelab.analysis import DashboardConfig, build_dashboard, parse_features

    cfg = config_from_args(DashboardConfig, args)
    parse_features(cfg.features, _sae_alone(args).cfg.d_sae)  # before loading the model
    index = build_dashboard(_analysis_load(args), cfg, progress=sys.stderr.isatty(),
                            say=say)
    print(index)
    return 0


COMMANDS = {"train": _train, "sweep": _sweep, "cache": _cache, "synth": _synth, "hooks": _hooks, "eval": _eval, "features": _features,
            "steer": _steer, "attribute": _attribute, "dashboard": _dashboard, "explain": _explain, "score": _score}


# --- meeting other tools: pretrained SAEs, Neuronpedia ------------------------------------------------------
def _add_interop_commands(commands) -> None:
    pre = commands.add_parser(
        "pretrained", help="list and describe the pretrained SAE releases SAE.from_pretrained knows",
        description="`saelab pretrained list` shows the registry of well-known releases (gpt2-small-res-jb, Gemma "
        "Scope, ...); --release R shows R's SAEs (repo, model, hook, d_sae, Neuronpedia id). `saelab pretrained "
        "show RELEASE [SAE_ID]` describes a release or one SAE: its files, whether the Hugging Face cache holds "
        "them, its Neuronpedia page. Nothing is downloaded; SAE.from_pretrained(release, sae_id) downloads.")
    actions = pre.add_subparsers(dest="action", required=True)
    listed = actions.add_parser("list", help="the registry's releases, or one release's SAEs")
    listed.add_argument("--release", help="show this release's SAEs instead")
    show = actions.add_parser("show", help="one release, or one SAE of it")
    show.add_argument("release", metavar="RELEASE", help="a registry release (saelab pretrained list) or a hub repo id")
    show.add_argument("sae_id", metavar="SAE_ID", nargs="?", help="an SAE of the release (default: list them all)")

    export = commands.add_parser(
        "neuronpedia-export", help="write feature data (top examples, logits, frequency) in Neuronpedia's import shape",
        description="Run the model over --tokens tokens of --dataset, collect every feature's top-activating "
        "examples and firing frequency, and write them with each feature's promoted and suppressed tokens (and "
        "a histogram of its logit effects) as Neuronpedia / SAEDashboard batch-N.json files into --out, with "
        "skipped_indexes.json (features that never fired) and run_settings.json. The Neuronpedia model id, "
        "layer and SAE set come from the SAE's metadata neuronpedia_id, else from its model and hook names.")
    add_sae_and_model_options(export)
    from saelab.analysis.neuronpedia_export import ExportConfig

    add_options(export, option_fields(ExportConfig))


def _pretrained(args) -> int:
    from saelab.sae.neuronpedia import neuronpedia_url
    from saelab.sae.pretrained import format_release, format_releases, format_sae

    if args.action == "list":
        print(format_release(args.release) if args.release else format_releases())
    elif args.sae_id:
        print(format_sae(args.release, args.sae_id, link=neuronpedia_url))
    else:
        print(format_release(args.release))
    return 0


def _neuronpedia_export(args) -> int:
    from saelab.analysis import collect_top_examples
    from saelab.analysis.neuronpedia_export import ExportConfig, export_neuronpedia, neuronpedia_source

    cfg = config_from_args(ExportConfig, args)
    loaded = _analysis_load(args)
    collector = collect_top_examples(loaded, cfg.dataset, tokens=cfg.tokens, n_top=cfg.n_top, window=cfg.window,
                                     context_size=cfg.context_size, batch_contexts=cfg.batch_contexts,
                                     split=cfg.dataset_split, text_column=cfg.text_column,
                                     include_special_tokens=cfg.include_special_tokens, progress=sys.stderr.isatty())
    source = neuronpedia_source(loaded.sae.cfg.metadata, model_id=cfg.model_id, layer=cfg.layer, sae_set=cfg.sae_set)
    context_size = cfg.context_size or int(loaded.sae.cfg.metadata.get("context_size") or 128)
    files = export_neuronpedia(loaded, collector, cfg.out, source, features_per_batch=cfg.features_per_batch,
                               logit_tokens=cfg.logit_tokens,
                               settings={"dataset": cfg.dataset, "context_size": context_size})
    say(f"wrote {len(files)} batch file(s) for {source.neuronpedia_id} into {cfg.out}")
    return 0


COMMANDS.update({"pretrained": _pretrained, "neuronpedia-export": _neuronpedia_export})
