"""Shared fixtures: tiny offline models and tokenizers, synthetic activations with known features."""

from __future__ import annotations

import pytest
import torch

SHARED_DATA = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data"


def make_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained in a moment on Python's bundled docs (no download)."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(topics.values())[:20], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_tiny_llama(vocab_size: int, hidden: int = 32, layers: int = 3, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama and its tokenizer saved as a local transformers folder."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = make_tokenizer()
    model = make_tiny_llama(len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def synthetic_activations(n: int, d_in: int, n_features: int, active: int, seed: int = 0):
    """Rows that are sparse non-negative combinations of ``n_features`` known unit directions."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_features, d_in, generator=g)
    directions /= directions.norm(dim=1, keepdim=True)
    chosen = torch.rand(n, n_features, generator=g).argsort(dim=1)[:, :active]
    weights = torch.zeros(n, n_features).scatter_(1, chosen, 0.5 + torch.rand(n, active, generator=g))
    return weights @ directions, directions


def mean_max_cosine(true_directions: torch.Tensor, learned_rows: torch.Tensor) -> float:
    learned = learned_rows / learned_rows.norm(dim=1, keepdim=True)
    return (true_directions @ learned.T).max(dim=1).values.mean().item()


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """A small English text file (40 topics of Python's bundled documentation), shared read-only."""
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("text") / "docs.txt"
    path.write_text("\n\n".join(list(topics.values())[:40]))
    return path
