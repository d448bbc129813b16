"""The command line: one config dataclass per command, its field help texts as ``--help``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from saelab.training.config import TrainConfig

TYPES = {"int": int, "float": float, "str": str}


def add_dataclass_options(parser: argparse.ArgumentParser, config_class) -> None:
    for f in dataclasses.fields(config_class):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        type_name = str(f.type).replace(" | None", "").strip()
        if type_name == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{help_text} (default: {f.default})")
            continue
        parser.add_argument(flag, type=TYPES[type_name], default=None, choices=f.metadata.get("choices"),
                            metavar=None if f.metadata.get("choices") else type_name.upper(),
                            help=f"{help_text} (default: {f.default})")


def config_from_args(config_class, args: argparse.Namespace, base=None):
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)
             if getattr(args, f.name, None) is not None}
    return dataclasses.replace(base, **given) if base is not None else config_class(**given)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saelab", description="Train, evaluate and read sparse autoencoders "
                                     "on language-model activations.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train an SAE on a model's activations, then evaluate it",
                                description="Train an SAE on one hook point of a language model, evaluate it "
                                "on held-out text and save it in the SAELens folder format. With no options: "
                                "a TopK SAE on SmolLM2-135M's residual stream after block 6, in runs/demo.")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its checkpoint "
                       "(other options are taken from the run)")
    train.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    add_dataclass_options(train, TrainConfig)

    hooks = commands.add_parser("hooks", help="list the hook point names a model supports")
    hooks.add_argument("--model", default=TrainConfig.model, help="model name, folder, .gguf file or hub id")

    ev = commands.add_parser(
        "eval", help="evaluate an SAE folder on held-out text and write a report",
        description="Evaluate an SAE (a saelab or SAELens folder) on text: L0, FVU, cosine, CE/KL with the SAE "
        "spliced in vs zero-ablation, dead/dense latents. Prints a table (or JSON with --json) and writes a "
        "report folder: metrics.json, summary.md, density_histogram.png, error_by_position.png.")
    ev.add_argument("sae", metavar="SAE_FOLDER", help="SAE folder (cfg.json + sae_weights.safetensors), or a "
                    "run folder of `saelab train` (its final/ SAE is used)")
    ev.add_argument("--model", help="language model: embedded alias, local folder, .gguf file or hub id "
                    "(default: the SAE's cfg.json metadata model_name)")
    ev.add_argument("--hook", help="hook point, TransformerLens-style name or module path (default: the SAE's "
                    "metadata hook_name)")
    ev.add_argument("--dataset", default="python-docs", help="evaluation text: a builtin corpus (python-docs, "
                    "python-docstrings), a .txt/.jsonl/.parquet file or folder, a saved HF dataset or a hub id; "
                    "its first --tokens tokens are used (default: python-docs)")
    ev.add_argument("--dataset-split", default="train", help="split to read from HF datasets (default: train)")
    ev.add_argument("--text-column", help="column holding text (default: text/content, or input_ids/tokens)")
    ev.add_argument("--tokens", type=int, default=16384, help="tokens of text to evaluate on, rounded up to "
                    "whole contexts; 200_000 is accepted (default: 16384)")
    ev.add_argument("--context-size", type=int, help="tokens per context (default: the SAE's metadata "
                    "context_size, else 128)")
    ev.add_argument("--prepend-bos", action=argparse.BooleanOptionalAction, default=None,
                    help="start every context with BOS (default: the SAE's metadata prepend_bos, else on)")
    ev.add_argument("--batch-contexts", type=int, default=8, help="contexts per model forward pass (default: 8)")
    ev.add_argument("--include-special-tokens", action="store_true", help="also evaluate (and splice at) "
                    "BOS/EOS/pad positions (default: they are left out, as in training)")
    ev.add_argument("--no-downstream", dest="downstream", action="store_false", help="reconstruction metrics "
                    "only: skip CE/KL and run the model only as far as the hook (faster)")
    ev.add_argument("--json", action="store_true", help="print the report as one JSON object on stdout "
                    "instead of the table")
    ev.add_argument("--out", metavar="REPORT_DIR", help="report folder (default: <run>/eval-<dataset> for a "
                    "run's final/ SAE, else <SAE_FOLDER>-eval-<dataset> beside the SAE folder)")
    ev.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        print(f"saelab {args.command}: error: {err}", file=sys.stderr)
        return 2


def _train(args) -> int:
    from saelab.pipeline import load_run_config, train

    if args.resume:
        cfg = config_from_args(TrainConfig, args, base=load_run_config(args.resume))
        cfg = dataclasses.replace(cfg, out=str(Path(args.resume)))
        summary = train(cfg, resume=True)
    else:
        summary = train(config_from_args(TrainConfig, args), overwrite=args.overwrite)
    return 0 if summary.completed else 130


def _hooks(args) -> int:
    from saelab.models import hook_names, load_model

    model, _ = load_model(args.model, device="cpu")
    for name in hook_names(model):
        print(name)
    return 0


def _eval(args) -> int:
    import json

    from saelab.evals import EvalConfig, format_table, run_eval
    from saelab.evals.report import report_json

    cfg = EvalConfig(sae=args.sae, model=args.model, hook=args.hook, dataset=args.dataset,
                     dataset_split=args.dataset_split, text_column=args.text_column, tokens=args.tokens,
                     context_size=args.context_size, prepend_bos=args.prepend_bos,
                     batch_contexts=args.batch_contexts, include_special_tokens=args.include_special_tokens,
                     downstream=args.downstream, out=args.out, device=args.device)

    def say(message: str) -> None:
        print(f"saelab: {message}", file=sys.stderr, flush=True)

    result = run_eval(cfg, progress=sys.stderr.isatty(), say=say)
    if args.json:
        print(json.dumps(report_json(result.metrics, result.info)))
    else:
        print(format_table(result.metrics, title=f"{result.info['model']} {result.info['hook']} on "
                           f"{args.dataset} ({result.metrics['tokens']:,} tokens):"))
    say(f"report written to {result.report_dir}")
    return 0


COMMANDS = {"train": _train, "hooks": _hooks, "eval": _eval}
