"""The command-line options that say which text is read and how it is packed, declared once for every command
that reads text (train, cache, sweep, eval, dashboard, neuronpedia-export)."""

from __future__ import annotations

from dataclasses import dataclass

from saelab.models.options import ModelOptions
from saelab.options import option

DATASET_HELP = ("Text: a builtin corpus (python-docs = python-reference + python-docstrings, ~300k tokens shipped "
                "with Python), a .txt/.jsonl/.parquet file, a folder of them or a saved HF dataset, or a hub dataset "
                "id (streamed). Rows with input_ids/tokens are used as pretokenized.")
SPLIT_HELP = "Split to read from HF datasets."
TEXT_COLUMN_HELP = "Column holding text (default: text/content, or input_ids/tokens)."
CONTEXT_SIZE_HELP = "Tokens per context; documents are concatenated with BOS between them."


def dataset_option(default: str = "python-docs", note: str = "", **roles):
    return option(default, DATASET_HELP + note, **roles)


def split_option(**roles):
    return option("train", SPLIT_HELP, **roles)


def text_column_option(**roles):
    return option(None, TEXT_COLUMN_HELP, **roles)


def context_size_option(default: int | None = 128, note: str = "", **roles):
    return option(default, CONTEXT_SIZE_HELP + note, positive=True, **roles)


@dataclass
class TextOptions:
    """How text becomes contexts of tokens. Every dictionary trained in one run reads the same text, and an
    activation cache fixes all of it (training on a cache takes these from its metadata)."""

    dataset: str = dataset_option(shared=True, cached=True)
    dataset_split: str = split_option(shared=True, cached=True)
    text_column: str | None = text_column_option(shared=True, cached=True)
    context_size: int = context_size_option(shared=True, cached=True)
    prepend_bos: bool = option(True, "Start every context with the BOS token.", shared=True, cached=True)
    exclude_special_tokens: bool = option(True, "Leave BOS/EOS/pad positions out of training and reconstruction "
                                          "metrics (their activations are huge outliers).", shared=True, cached=True)
    lm_batch_size: int = option(16, "Contexts per language-model forward pass.", positive=True, shared=True,
                                cached=True)


@dataclass
class DataOptions(TextOptions, ModelOptions):
    """Where a training run's activations come from (the model over text, or a cache) and its held-out text."""

    activations: str | None = option(None, "Train on an activation cache written by `saelab cache` (its folder) "
                                     "instead of running the model: --hook picks one of its hooks (default: its "
                                     "only one); model, text and packing come from the cache. The final "
                                     "evaluation holds out its last --eval-tokens tokens (reconstruction "
                                     "metrics); only --eval-dataset loads the model, for CE/KL too.", shared=True)
    synthetic: str | None = option(None, "Train on synthetic activations with known features, generated as "
                                   "this JSON config says (`saelab synth --out CONFIG.json` writes one), instead "
                                   "of a model: no model is loaded, and the final evaluation scores the SAE "
                                   "against the true features (MCC, F1, uniqueness) on --eval-tokens held-out "
                                   "samples. --hook is only a name then.", shared=True, fixed_on_resume=True)
    eval_dataset: str | None = option(None, "Held-out text for the final evaluation (default: the first "
                                      "eval_tokens of --dataset, which training then skips).", shared=True)
    eval_tokens: int = option(8192, "Tokens of held-out text for the final evaluation (0: skip it).", shared=True)
    max_activation_norm_multiple: float | None = option(None, "Leave out of training the activation rows whose "
                                                        "norm is above this many times the median norm (of the "
                                                        "first forward batch, per hook): some models have massive "
                                                        "activations at a few positions besides BOS. Recorded in "
                                                        "the SAE's metadata; the evaluation still sees every row "
                                                        "(default: keep all).", positive=True, shared=True,
                                                        fixed_on_resume=True)
