"""Tokenise documents and pack them into fixed-length contexts.

Convention (recorded in every SAE's metadata, as SAELens does): documents are concatenated with the
BOS token between them (``sequence_separator_token: "bos"``), and with ``prepend_bos`` every context
starts with BOS followed by ``context_size - 1`` tokens of that stream.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from saelab.data.text import Document

TOKENIZE_BATCH = 64  # documents per tokenizer call: fast tokenizers parallelise within a call


@dataclass(frozen=True)
class Packing:
    context_size: int = 128
    prepend_bos: bool = True


def bos_id(tokenizer) -> int:
    """The token that starts contexts and separates documents (EOS where a tokenizer has no BOS)."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token; cannot mark context starts")
    return token


def special_ids(tokenizer) -> torch.Tensor:
    return torch.tensor(sorted(set(tokenizer.all_special_ids) | {bos_id(tokenizer)}), dtype=torch.long)


def _token_stream(documents: Iterable[Document], tokenizer) -> Iterator[list[int]]:
    """Token ids of each document, tokenised in batches."""
    pending: list[str] = []
    for doc in documents:
        if isinstance(doc, str):
            pending.append(doc)
            if len(pending) >= TOKENIZE_BATCH:
                yield from tokenizer(pending, add_special_tokens=False)["input_ids"]
                pending = []
        else:
            if pending:
                yield from tokenizer(pending, add_special_tokens=False)["input_ids"]
                pending = []
            yield doc
    if pending:
        yield from tokenizer(pending, add_special_tokens=False)["input_ids"]


def pack_contexts(documents: Iterable[Document], tokenizer, packing: Packing) -> Iterator[list[int]]:
    """Yield contexts of exactly ``packing.context_size`` token ids; the ragged tail is dropped."""
    bos = bos_id(tokenizer)
    body = packing.context_size - 1 if packing.prepend_bos else packing.context_size
    stream: list[int] = []
    first = True
    for ids in _token_stream(documents, tokenizer):
        if len(ids) == packing.context_size and (not packing.prepend_bos or ids[0] == bos):
            yield list(ids)  # already packed (a pretokenized dataset)
            continue
        if not ids:
            continue
        if not first:
            stream.append(bos)
        first = False
        stream.extend(ids)
        while len(stream) >= body:
            chunk, stream = stream[:body], stream[body:]
            yield [bos, *chunk] if packing.prepend_bos else chunk


def context_batches(contexts: Iterable[list[int]], batch_contexts: int) -> Iterator[torch.Tensor]:
    """Group contexts into ``[batch_contexts, context_size]`` tensors; a final short batch is kept."""
    batch: list[list[int]] = []
    for ctx in contexts:
        batch.append(ctx)
        if len(batch) == batch_contexts:
            yield torch.tensor(batch, dtype=torch.long)
            batch = []
    if batch:
        yield torch.tensor(batch, dtype=torch.long)
