"""Activation sources and the shuffling buffer that turns any of them into training batches.

A source yields *units* (one model forward's worth of activation rows, ``[rows, d_in]``) and can start
at any unit index, deterministically. That is what makes resume exact: the buffer's position is just
(block, batch within block, epoch, first unit of the block).

Under data parallelism each process reads its own *shard* of a source (``shard_of``): every ``count``-th unit
from the ``index``-th, computed by that process alone, so N processes run the model over the text once
between them, not N times.
"""

from __future__ import annotations

import copy
import hashlib
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from itertools import islice
from typing import Protocol

import torch
from tqdm.auto import tqdm

from saelab.data.options import TextOptions
from saelab.data.text import iter_documents
from saelab.data.tokens import Packing, context_batches, pack_contexts, special_ids
from saelab.models.hooks import HookPoint, capture, hook_widths

PREFETCH_BATCHES = 4  # token batches the tokenizer thread may run ahead of the model


class ActivationSource(Protocol):
    d_in: int

    def units(self, start: int) -> Iterator[torch.Tensor]:
        """Activation rows ``[rows, d_in]`` (float32, CPU), one unit at a time, from unit ``start`` to the end."""
        ...


def shard_of(source: ActivationSource, index: int, count: int) -> ActivationSource:
    """Units ``index``, ``index + count``, ``index + 2 count``, ... of ``source``, numbered 0, 1, 2, ...: one
    process's share under data parallelism (the shards of all ``count`` processes partition the units).
    The built-in sources compute or read only their own units (``source.shard``); any other is read whole
    and the other units dropped."""
    if not 0 <= index < count:
        raise ValueError(f"shard {index} is outside 0..{count - 1}")
    if count == 1:
        return source
    if hasattr(source, "shard"):
        return source.shard(index, count)
    return _EveryNthUnit(source, index, count)


@dataclass(frozen=True)
class UnitShard:
    """Which units of a whole source a shard holds: global unit ``index + i * count`` is its unit ``i``."""

    index: int = 0
    count: int = 1

    def first(self, start: int) -> int:
        """The global number of this shard's unit ``start``."""
        return self.index + start * self.count

    def within(self, index: int, count: int) -> UnitShard:
        """The shard ``(index, count)`` of this shard, in the whole source's numbering."""
        return UnitShard(self.index + index * self.count, self.count * count)


class ShardableSource:
    """A source that computes or reads only its own units when sharded: ``part`` says which (all, by
    default); ``units`` starts at global unit ``part.first(start)`` and steps ``part.count``."""

    part: UnitShard = UnitShard()

    def shard(self, index: int, count: int):
        """A copy of this source over its units ``index::count``."""
        part = copy.copy(self)
        part.part = self.part.within(index, count)
        return part


class _EveryNthUnit:
    def __init__(self, source: ActivationSource, index: int, count: int):
        self.source, self.d_in, self.part = source, source.d_in, UnitShard(index, count)
        self.columns = getattr(source, "columns", {})

    def units(self, start: int) -> Iterator[torch.Tensor]:
        yield from islice(self.source.units(self.part.first(start)), 0, None, self.part.count)


class LMActivationSource(ShardableSource):
    """Activations of one or more hook points of a language model, over packed contexts of a text source.

    With several hooks, one forward pass (stopped after the deepest of them) gives all of them, and a unit
    holds their columns side by side in the order given: ``columns[name]`` is each hook's slice, ``d_in``
    their total width. The tokenizer runs ahead of the model in a background thread.
    """

    def __init__(self, model, tokenizer, hook: HookPoint | Sequence[HookPoint], dataset: str, packing: Packing, *,
                 split: str = "train", text_column: str | None = None, batch_contexts: int = 16,
                 exclude_special_tokens: bool = True, skip_contexts: int = 0, max_contexts: int | None = None):
        self.hooks = [hook] if isinstance(hook, HookPoint) else list({h.name: h for h in hook}.values())
        self.model, self.tokenizer, self.hook = model, tokenizer, self.hooks[0]
        self.dataset, self.split, self.text_column, self.packing = dataset, split, text_column, packing
        self.batch_contexts = batch_contexts
        self.exclude_special_tokens = exclude_special_tokens
        self.skip_contexts, self.max_contexts = skip_contexts, max_contexts
        self._special = special_ids(tokenizer)
        self.device = next(model.parameters()).device
        widths = hook_widths(model, self.hooks, self._special[0].item())
        self.columns: dict[str, slice] = {}
        offset = 0
        for h in self.hooks:
            self.columns[h.name] = slice(offset, offset + widths[h.name])
            offset += widths[h.name]
        self.d_in = offset

    def token_batches(self, start: int = 0) -> Iterator[torch.Tensor]:
        """``[batch_contexts, context_size]`` token ids, beginning at unit ``start``."""
        first = self.skip_contexts + start * self.batch_contexts
        last = None if self.max_contexts is None else self.skip_contexts + self.max_contexts
        if last is not None and first >= last:
            return

        def batches() -> Iterator[torch.Tensor]:
            contexts = pack_contexts(iter_documents(self.dataset, self.split, self.text_column), self.tokenizer,
                                     self.packing)
            yield from context_batches(islice(contexts, first, last), self.batch_contexts)
        yield from prefetched(batches(), PREFETCH_BATCHES)

    def keep_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """Positions whose activations are used: all, or all but special tokens (BOS is an attention sink)."""
        if not self.exclude_special_tokens:
            return torch.ones_like(tokens, dtype=torch.bool)
        return ~torch.isin(tokens, self._special)

    def units(self, start: int) -> Iterator[torch.Tensor]:
        # Sharded, every process tokenises the whole text (cheap) and runs the model on its own batches only.
        on_gpu = self.device.type == "cuda"
        # bf16 autocast on a GPU (on a CPU bf16 matmuls are far slower than fp32).
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else nullcontext()
        for number, tokens in enumerate(self.token_batches(self.part.first(start))):
            if number % self.part.count:  # another process's batch
                continue
            with autocast:
                captured = capture(self.model, tokens.pin_memory().to(self.device, non_blocking=True) if on_gpu
                                   else tokens, self.hooks)
            keep = self.keep_mask(tokens).to(self.device)
            acts = [captured[h.name][keep] for h in self.hooks]
            yield (acts[0] if len(acts) == 1 else torch.cat(acts, dim=-1)).float().cpu()


def text_activations(model, tokenizer, hooks: HookPoint | Sequence[HookPoint], text: TextOptions,
                     dataset: str | None = None, **kwargs) -> LMActivationSource:
    """The activations of ``hooks`` over ``dataset`` (default ``text.dataset``), tokenised and packed as
    ``text`` says; ``kwargs``: ``skip_contexts``, ``max_contexts``."""
    return LMActivationSource(model, tokenizer, hooks, dataset or text.dataset,
                              Packing(text.context_size, text.prepend_bos), split=text.dataset_split,
                              text_column=text.text_column, batch_contexts=text.lm_batch_size,
                              exclude_special_tokens=text.exclude_special_tokens, **kwargs)


def check_finite(rows: torch.Tensor, source, unit: int) -> None:
    """Stop at activations that are NaN or infinite (a model run in fp16 overflows; a float16 cache clips):
    training on them would make the SAE NaN. The error names the hook and the forward batch."""
    finite = torch.isfinite(rows)
    if bool(finite.all()):
        return
    bad_columns = (~finite).any(0)
    hooks = [name for name, columns in getattr(source, "columns", {}).items() if bool(bad_columns[columns].any())]
    where = f"hook {', '.join(hooks)}" if hooks else "the activations"
    raise ValueError(f"{where}: forward batch {unit} holds {int((~finite).sum())} NaN or infinite values, which would "
                     "make the SAE NaN. Run the model in float32 (--device cpu, or a float32 cache: saelab cache "
                     "--dtype float32), or leave special tokens out (--exclude-special-tokens).")


def prefetched(items: Iterable, depth: int) -> Iterator:
    """The items of ``items``, in order, produced by a background thread up to ``depth`` ahead (the
    tokenizer's Rust code releases the GIL, so it overlaps the model). Its exceptions reach the consumer;
    closing the generator stops the thread."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        slots.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put((end, None))
        except BaseException as err:  # handed to the consumer, raised there
            slots.put((end, err))

    thread = threading.Thread(target=produce, daemon=True, name="saelab-tokenizer")
    thread.start()
    try:
        while True:
            item, err = slots.get()
            if err is not None:
                raise err
            if item is end:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # let it finish its current item; it then sees the stop
            try:
                slots.get(timeout=0.1)
            except queue.Empty:
                pass
        thread.join()


class TensorSource(ShardableSource):
    """Activations already in memory (tests, synthetic data, rows collected once from a model). ``columns``:
    which columns belong to which hook, when several sit side by side."""

    def __init__(self, data: torch.Tensor, rows_per_unit: int = 4096, columns: dict[str, slice] | None = None):
        self.data, self.rows_per_unit, self.d_in = data, rows_per_unit, data.shape[-1]
        self.columns = columns or {}

    def units(self, start: int) -> Iterator[torch.Tensor]:
        step = self.part.count * self.rows_per_unit
        for begin in range(self.part.first(start) * self.rows_per_unit, len(self.data), step):
            yield self.data[begin:begin + self.rows_per_unit].float()


class NormFilter:
    """An ``ActivationSource`` without the rows whose norm is above ``multiple`` times the median row norm of
    the source's first unit (per hook, when several sit side by side; a row goes when any hook's part is
    over): some models have massive activations at a few positions besides BOS, and a handful of them can
    dominate an SAE's loss. The limits come from unit 0, so a resumed run recomputes the same ones."""

    def __init__(self, source: ActivationSource, multiple: float, whole: ActivationSource | None = None):
        self.source, self.multiple, self.d_in = source, multiple, source.d_in
        self.columns = getattr(source, "columns", {})
        # The source the limits come from: under data parallelism the whole one, so that every process's
        # shard is filtered with the same limits (from the whole source's first unit).
        self.whole = whole or source
        self._limits: list[tuple[slice, float]] | None = None

    def shard(self, index: int, count: int) -> NormFilter:
        return NormFilter(shard_of(self.source, index, count), self.multiple, whole=self.whole)

    def limits(self) -> list[tuple[slice, float]]:
        if self._limits is None:
            units = self.whole.units(0)
            try:
                first = next(units)
            finally:
                units.close()
            spans = list(self.columns.values()) or [slice(0, self.d_in)]
            self._limits = [(span, self.multiple * float(first[:, span].norm(dim=1).median())) for span in spans]
        return self._limits

    def rows(self) -> int:
        """The rows read (before filtering), for a source that knows its size (a cache)."""
        return self.source.rows()

    def units(self, start: int) -> Iterator[torch.Tensor]:
        limits = self.limits()
        for rows in self.source.units(start):
            keep = torch.ones(len(rows), dtype=torch.bool)
            for span, limit in limits:
                keep &= rows[:, span].norm(dim=1) <= limit
            yield rows[keep]


class _Rows:
    """A block's rows, copied into one tensor as units arrive: gathering them in a list and concatenating would hold
    the block twice at its peak. Room for ``expected`` rows plus the first unit is made at once (pages not written
    yet take no memory); a block that outgrows it is moved to a larger tensor."""

    def __init__(self, expected: int):
        self.expected, self.filled, self.data = expected, 0, None

    def append(self, chunk: torch.Tensor) -> None:
        end = self.filled + len(chunk)
        if self.data is None or end > len(self.data):
            grown = chunk.new_empty((max(end, self.expected + len(chunk)), chunk.shape[1]))
            if self.data is not None:
                grown[:self.filled] = self.data[:self.filled]
            self.data = grown
        self.data[self.filled:end] = chunk
        self.filled = end

    def rows(self) -> torch.Tensor:
        return self.data[:self.filled]


@dataclass
class BufferPosition:
    block: int = 0          # blocks begun since the start of training
    batch: int = 0          # batches served from the current block
    epoch: int = 0          # passes over the source begun
    unit: int = 0           # the source unit the current block starts at


class ActivationBuffer:
    """Fills a block of ``buffer_tokens`` activation rows, shuffles it, serves batches, refills.

    Memory is bounded by one block (``buffer_tokens * d_in * 4`` bytes). When the whole source fits in
    one block it is computed once and reshuffled for every later epoch, so a small corpus can be trained
    on for many epochs at the cost of a single forward pass over it. Blocks are kept on ``device`` (the
    training device): on a GPU a block crosses from pinned memory once, not batch by batch.
    """

    def __init__(self, source: ActivationSource, buffer_tokens: int, batch_size: int, seed: int,
                 progress: bool = False, device: str | torch.device | None = None):
        if buffer_tokens < batch_size:
            raise ValueError(f"buffer_tokens ({buffer_tokens}) must be at least batch_size ({batch_size})")
        self.source, self.buffer_tokens, self.batch_size, self.seed = source, buffer_tokens, batch_size, seed
        self.progress = progress
        self.device = torch.device(device or "cpu")
        self.position = BufferPosition()
        self._resident: torch.Tensor | None = None  # the whole source, when it fits in one block
        self._block: torch.Tensor | None = None
        self._next: tuple[int, int] = (0, 0)        # (epoch, unit) where the following block starts
        self.units_read = 0                          # units taken from the source (forward passes of a model)

    def state_dict(self) -> dict:
        return asdict(self.position)

    def load_state_dict(self, state: dict) -> None:
        self.position = BufferPosition(**state)
        self._block = None

    def batches(self) -> Iterator[torch.Tensor]:
        """An endless stream of ``[batch_size, d_in]`` batches; ``position`` counts those handed out."""
        while True:
            if self._block is None:
                self._block, self._next = self._fill(self.position.epoch, self.position.unit)
            order = torch.randperm(len(self._block), generator=self._block_generator()).to(self.device)
            n_batches = len(self._block) // self.batch_size
            if n_batches == 0:
                raise ValueError(f"the activation source gave {len(self._block)} tokens, fewer than one batch "
                                 f"({self.batch_size}); use more data or a smaller batch size")
            while self.position.batch < n_batches:
                start = self.position.batch * self.batch_size
                self.position.batch += 1
                yield self._block[order[start:start + self.batch_size]]
            epoch, unit = self._next
            self.position = BufferPosition(self.position.block + 1, 0, epoch, unit)
            self._block = None

    def peek(self, rows: int) -> torch.Tensor:
        """The first rows of the current block, without consuming anything (for initialisation)."""
        if self._block is None:
            self._block, self._next = self._fill(self.position.epoch, self.position.unit)
        return self._block[:rows]

    def _block_generator(self) -> torch.Generator:
        digest = hashlib.sha256(f"{self.seed}:{self.position.block}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))

    def _fill(self, epoch: int, unit: int) -> tuple[torch.Tensor, tuple[int, int]]:
        if unit == 0 and self._resident is not None:
            return self._resident, (epoch + 1, 0)
        block, next_unit = _Rows(self.buffer_tokens), unit
        bar = tqdm(total=self.buffer_tokens, desc="collecting activations", unit="tok", unit_scale=True,
                   disable=not self.progress, leave=False)
        for chunk in self.source.units(unit):
            check_finite(chunk, self.source, next_unit)
            self.units_read += 1
            block.append(chunk)
            next_unit += 1
            bar.update(len(chunk))
            if block.filled >= self.buffer_tokens:
                break
        else:  # the source ran out: the next block starts the next epoch
            bar.close()
            if not block.filled and unit > 0:  # the previous block ended exactly at the end of the source
                return self._fill(epoch + 1, 0)
            if not block.filled:
                raise ValueError("the activation source is empty: the dataset gave no tokens "
                                 "(check the dataset path, split and text column)")
            rows = self._placed(block.rows())
            if unit == 0:
                self._resident = rows
            return rows, (epoch + 1, 0)
        bar.close()
        return self._placed(block.rows()), (epoch, next_unit)

    def _placed(self, block: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return block.pin_memory().to(self.device, non_blocking=True)
        return block.to(self.device)
