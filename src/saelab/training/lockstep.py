"""Dictionaries trained at once on one stream of activations, each by its own Trainer (own run folder,
checkpoint, metrics and exact resume), stepped in lockstep. Every run is this, with one trainer or many.

The trainers read one ``SharedBuffer``: a single ActivationBuffer whose rows hold every hook's columns
side by side (``LMActivationSource`` with several hooks: one forward pass per unit). Each trainer's view
takes its hook's columns of the same shuffled batches. With equal data settings (buffer size, batch size,
seed) a view serves exactly the batches a buffer of its own would, so an SAE trained here equals the SAE
trained alone; and N SAEs hold one block of activations per distinct hook, not one per SAE.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict

import torch
from tqdm.auto import tqdm

from saelab.data.activations import ActivationBuffer
from saelab.training.trainer import Trainer, TrainResult, _sigint_requests_stop


class SharedBuffer:
    """One ActivationBuffer read by several views, each at its own pace. Batches one view has taken and
    another has not yet are kept (with the buffer position after each, for the views' checkpoints);
    views that step together keep at most one."""

    def __init__(self, buffer: ActivationBuffer):
        self.buffer = buffer
        self._stream: Iterator[torch.Tensor] | None = None
        self._drawn: deque[tuple[torch.Tensor, dict]] = deque()   # (batch, buffer position after it)
        self._first = 0                                              # stream index of _drawn[0]
        self._views: list[BufferView] = []
        self._loaded: dict | None = None                             # the position a resume started from

    def view(self, columns: slice | list[slice], target_columns: slice | list[slice] | None = None) -> BufferView:
        """A reader of these columns (a crosscoder's: several hooks' columns, side by side; a transcoder's target
        columns too), with the ActivationBuffer interface a Trainer uses."""
        view = BufferView(self, columns, target_columns)
        self._views.append(view)
        return view

    def batch(self, index: int) -> tuple[torch.Tensor, dict]:
        """Batch ``index`` of the stream (since its start or resume) and the buffer position after it."""
        if self._stream is None:
            self._stream = self.buffer.batches()
        while index >= self._first + len(self._drawn):
            batch = next(self._stream)
            self._drawn.append((batch, self.buffer.state_dict()))
        return self._drawn[index - self._first]

    def release(self) -> None:
        """Forget the batches every view has read."""
        oldest = min(view.index for view in self._views)
        while self._first < oldest:
            self._drawn.popleft()
            self._first += 1

    def load_state_dict(self, state: dict) -> None:
        if self._stream is not None:
            raise RuntimeError("a shared buffer can only be resumed before its first batch")
        if self._loaded is None:
            self.buffer.load_state_dict(state)
            self._loaded = dict(state)
        elif self._loaded != dict(state):
            raise ValueError(f"cannot resume SAEs trained together from different data positions ({self._loaded} "
                             f"and {state}): their checkpoints come from different runs. Resume each run on its own.")


class BufferView:
    """One trainer's window on a SharedBuffer: its columns of every batch, and its own position. With
    ``target_columns`` (a transcoder's output hook) each batch is the pair ``(input, target)``."""

    def __init__(self, shared: SharedBuffer, columns: slice | list[slice],
                 target_columns: slice | list[slice] | None = None):
        self.shared = shared
        self.blocks = [columns] if isinstance(columns, slice) else list(columns)
        self.block_widths = [block.stop - block.start for block in self.blocks]  # per hook, for their scales
        self.d_in = sum(self.block_widths)
        self.target_blocks = None if target_columns is None else \
            [target_columns] if isinstance(target_columns, slice) else list(target_columns)
        self.d_out = sum(block.stop - block.start for block in self.target_blocks) if self.target_blocks else None
        self.index = 0                     # batches taken
        self.position: dict | None = None  # buffer position after the last batch taken

    def batches(self) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        while True:
            batch, self.position = self.shared.batch(self.index)
            self.index += 1
            self.shared.release()
            yield self._columns(batch)

    def peek(self, rows: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self._columns(self.shared.buffer.peek(rows))

    def _columns(self, rows: torch.Tensor):
        x = _side_by_side(rows, self.blocks)
        return x if self.target_blocks is None else (x, _side_by_side(rows, self.target_blocks))

    def state_dict(self) -> dict:
        return dict(self.position) if self.position is not None else asdict(self.shared.buffer.position)

    def load_state_dict(self, state: dict) -> None:
        self.shared.load_state_dict(state)
        self.position = dict(state)


def _side_by_side(rows: torch.Tensor, blocks: list[slice]) -> torch.Tensor:
    return rows[:, blocks[0]].contiguous() if len(blocks) == 1 else torch.cat([rows[:, block] for block in blocks], 1)


class MultiTrainer:
    """Steps several trainers once each per round until all are done. Ctrl-C (or ``request_stop``) stops
    them all after the round, each with its checkpoint written; ``run(resume=True)`` continues them."""

    def __init__(self, trainers: list[Trainer], progress: bool = True):
        if not trainers:
            raise ValueError("MultiTrainer needs at least one trainer")
        self.trainers, self.progress = trainers, progress
        self._stop_requested = False

    def request_stop(self) -> None:
        self._stop_requested = True

    def run(self, resume: bool = False, on_step: Callable[[MultiTrainer], None] | None = None) -> list[TrainResult]:
        for trainer in self.trainers:
            trainer.open(resume, progress=False)
        tokens_per_round = sum(t.cfg.batch_size for t in self.trainers)
        n = len(self.trainers)
        bar = tqdm(total=sum(t.total_steps * t.cfg.batch_size for t in self.trainers), unit="tok", unit_scale=True,
                   initial=sum(t.step * t.cfg.batch_size for t in self.trainers), disable=not self.progress,
                   desc="training" if n == 1 else f"training {n} SAEs", dynamic_ncols=True)
        completed = True
        try:
            with _sigint_requests_stop(self):
                while not all(t.done for t in self.trainers):
                    lead = self.trainers[0]  # under torchrun: every rank stops at the same step
                    if lead.dp.agree_to_stop(self._stop_requested, lead.step, lead.cfg.log_every):
                        completed = False
                        break
                    for trainer in self.trainers:
                        if not trainer.done:
                            trainer.advance()
                    bar.update(tokens_per_round)
                    if on_step is not None:
                        on_step(self)
        finally:
            bar.close()
        return [trainer.close(completed) for trainer in self.trainers]
