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


COMMANDS = {"train": _train, "hooks": _hooks}
