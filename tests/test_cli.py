"""`saelab train` end to end on a tiny local model, and the errors a user meets on bad input."""

import argparse
import json

import pytest

from saelab import SAE
from saelab.cli import build_parser, main, option_fields
from saelab.training.sweep import SweepConfig
from saelab.training import TrainConfig

FAST = ["--tokens", "16384", "--k", "4", "--lr", "3e-3", "--batch-size", "256", "--context-size", "32", "--lm-batch-size", "8",
        "--buffer-tokens", "4096", "--eval-tokens", "512", "--hook", "blocks.1.hook_resid_post",
        "--no-progress", "--log-every", "4"]


def test_train_end_to_end_on_a_local_model_folder(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "run"
    rc = main(["train", "--model", str(tiny_model_dir), "--dataset", str(text_file), "--out", str(out), *FAST])
    assert rc == 0
    sae = SAE.load(out / "final")
    assert sae.cfg.d_in == 32 and sae.cfg.d_sae == 256 and sae.cfg.k == 4
    assert sae.cfg.metadata["hook_name"] == "blocks.1.hook_resid_post"
    assert sae.cfg.metadata["context_size"] == 32 and sae.cfg.metadata["prepend_bos"] is True
    metrics = json.loads((out / "eval.json").read_text())
    assert 0 < metrics["l0"] <= 4 and metrics["tokens"] > 400
    for key in ("explained_variance", "ce_loss_score", "kl_score", "ce_clean", "ce_with_sae"):
        assert isinstance(metrics[key], float) and metrics[key] == metrics[key]
    assert metrics["explained_variance"] > 0.5  # a random tiny model's residual stream is easy to fit
    assert (out / "training_curves.png").exists() and (out / "metrics.jsonl").read_text()
    # A second run into the same folder must not clobber it silently.
    assert main(["train", "--model", str(tiny_model_dir), "--dataset", str(text_file), "--out", str(out), *FAST]) == 2


def subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """``(words, parser, one-line help)`` of every subcommand under ``parser``, nested ones (``pretrained list``)
    included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield (*prefix, name), sub, helps.get(name)
                yield from subcommands(sub, (*prefix, name))


def flags(config) -> list[str]:
    """The flag of every field the command line offers for ``config`` (TrainConfig: with every registered
    architecture's settings)."""
    return ["--" + field.name.replace("_", "-") for field in option_fields(config)]


SUBCOMMANDS = [" ".join(words) for words, _, _ in subcommands(build_parser())]
# What a subcommand's --help must say besides its options, and must not say.
HELP_MENTIONS = {
    "train": [*flags(TrainConfig), "TransformerLens", "default: smollm2-135m"],
    "sweep": [*flags(SweepConfig), "--architectures", "--k", "--target-l0", "--target-l0s", "--l1-coefficient",
              "--l1-coefficients", "--tokens", "--out", "--lr", "--activation-tokens", "--dead-latent-remedy",
              "--resample-every-tokens"],
    "eval": ["--model", "--hook", "--dataset", "--dataset-split", "--text-column", "--tokens", "--context-size",
             "--batch-contexts", "--include-special-tokens", "--no-downstream", "--json", "--out", "--device",
             "metrics.json", "eval-<dataset>"],
}
# A sweep sets these per grid point (--architectures, its own --out): train's forms are not offered.
HELP_OMITS = {"sweep": ["--architecture ", "--architecture STR"]}


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_option_has_help(command, capsys):
    """Every option of every subcommand has a help text, and ``saelab COMMAND --help`` shows it."""
    assert {"train", "sweep", "eval", "features", "steer", "attribute", "dashboard", "pretrained list",
            "pretrained show"} <= set(SUBCOMMANDS)  # the discovery found them all
    words = tuple(command.split())
    parser, summary = next((sub, summary) for w, sub, summary in subcommands(build_parser()) if w == words)
    assert summary, f"`saelab {command}` has no one-line help in its parent's list"
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args([*words, "--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):  # its subcommands are cases of their own
            assert set(action.choices) <= set(text.split()), command
            continue
        assert action.help and action.help != argparse.SUPPRESS, (command, action.dest)
        for shown in action.option_strings or [action.metavar or action.dest]:
            assert shown in text, (command, shown)
    for needed in HELP_MENTIONS.get(command, []):
        assert needed in text, (command, needed)
    for absent in HELP_OMITS.get(command, []):
        assert absent not in text, (command, absent)


def run_cli(args, capsys):
    rc = main(args)
    return rc, capsys.readouterr().err


def test_unknown_model_is_a_clear_error(tmp_path, capsys):
    rc, err = run_cli(["train", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "r")], capsys)
    assert rc == 2 and "no such folder" in err and "smollm2-135m" in err


def test_unknown_hook_lists_the_valid_ones(tiny_model_dir, text_file, tmp_path, capsys):
    args = ["train", "--model", str(tiny_model_dir), "--dataset", str(text_file), "--out", str(tmp_path / "r"),
            *FAST, "--hook", "blocks.9.hook_resid_post"]
    rc, err = run_cli(args, capsys)
    assert rc == 2 and "unknown hook point 'blocks.9.hook_resid_post'" in err and "hook_mlp_out" in err


def test_empty_dataset_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    rc, err = run_cli(["train", "--model", str(tiny_model_dir), "--dataset", str(empty),
                       "--out", str(tmp_path / "r"), *FAST, "--eval-tokens", "0"], capsys)
    assert rc == 2 and "empty" in err


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    rc, err = run_cli(["train", "--resume", str(tmp_path / "never-ran")], capsys)
    assert rc == 2 and "nothing to resume" in err


def test_hooks_command_lists_names(tiny_model_dir, capsys):
    assert main(["hooks", "--model", str(tiny_model_dir)]) == 0
    names = capsys.readouterr().out.split()
    assert "blocks.0.hook_resid_pre" in names and "blocks.2.hook_mlp_out" in names
