"""The training loop: batches from an activation buffer, Adam with warm-up and decay, dead-latent
tracking, metrics, atomic checkpoints and exact resume. It knows nothing of language models."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import signal
import threading
import time
from contextlib import contextmanager
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

import torch
from tqdm.auto import tqdm

from saelab.data.activations import ActivationBuffer, ActivationSource, shard_of
from saelab.files import FileFormatError, writing
from saelab.options import fields_with
from saelab.sae import SAE, SAEConfig, TrainStep, create_sae
from saelab.sae.base import normalized_error
from saelab.training.config import TrainConfig
from saelab.distributed import DataParallel
from saelab.training.tracking import NullTracker

CHECKPOINT_FILE = "checkpoint.pt"
# The checkpoint before the newest: SAEs trained together write theirs one after another, so a kill can leave
# them one checkpoint apart, and a resume then goes back to the newest step all of them have.
PREVIOUS_CHECKPOINT_FILE = "checkpoint.prev.pt"
METRICS_FILE = "metrics.jsonl"
INIT_SAMPLE_ROWS = 8192
RESAMPLE_ENCODER_SCALE = 0.2  # resampled encoder rows: this times the mean norm of the live ones


@dataclass
class TrainResult:
    sae: SAE                 # takes raw activations (input scaling folded in)
    completed: bool          # False when stopped early (Ctrl-C): resume from the checkpoint
    steps: int
    tokens: int
    seconds: float
    firing_frequency: torch.Tensor   # [d_sae], over the last dead window of training
    dead_fraction: float             # latents silent for the last dead window at the end


@dataclass
class _Session:
    """What an open run keeps between steps: its batch stream, log file and progress bar, the sums of the
    loss terms since the last log line (tensors: summing them needs no host sync) and the seconds its own
    steps took since then (with several trainers in lockstep, each counts only its own)."""
    batches: Iterator[torch.Tensor]
    metrics_file: TextIO
    bar: tqdm
    next_checkpoint: int
    totals: dict = field(default_factory=dict)
    steps_in_log: int = 0
    seconds_in_log: float = 0.0


class Trainer:
    """Trains one SAE. ``run()`` does it all; ``open()``, ``advance()`` (one step) until ``done``, then
    ``close()`` let a driver step several trainers in lockstep (training/multi.py). ``buffer`` (default:
    one of its own over ``source``) is where batches come from, e.g. a view of a buffer shared by several
    trainers; ``source`` then only has to give ``d_in``."""

    def __init__(self, cfg: TrainConfig, source: ActivationSource, run_dir, metadata: dict | None = None,
                 buffer=None, data_parallel: DataParallel | None = None, tracker: NullTracker | None = None):
        self.cfg, self.source, self.run_dir = cfg, source, Path(run_dir)
        # Under torchrun: this rank trains on its share of each batch; rank 0 alone writes files and logs.
        self.dp = data_parallel or DataParallel()
        self.dp.check_batch_size(cfg.batch_size)
        self.tracker = tracker or NullTracker()  # W&B (training/tracking.py), or nothing
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.metadata = metadata or {}
        self.buffer = buffer or training_buffer(source, cfg, self.dp, self.device)
        d_sae = cfg.d_sae or cfg.expansion * source.d_in
        settings = cfg.settings
        # A transcoder's source (a BufferView with target columns) gives the output's width too.
        d_out = getattr(source, "d_out", None) if cfg.kind_facts.separate_output else None
        if cfg.kind_facts.separate_output and d_out is None:
            raise ValueError(f"a {cfg.kind} trains on pairs of activations (its input and output hooks): give it a "
                             "source with target columns (saelab.training.train does)")
        # A crosscoder's source holds its hooks side by side (a BufferView's block_widths).
        widths = list(getattr(source, "block_widths", None) or [source.d_in])
        n_hooks = len(widths) if cfg.kind_facts.multi_hook else 1
        if n_hooks > 1 and len(set(widths)) > 1:
            raise ValueError(f"a {cfg.kind}'s hook points must be equally wide (got {widths})")
        sae_cfg = SAEConfig(d_in=source.d_in, d_sae=d_sae, architecture=cfg.architecture, metadata=self.metadata,
                            kind=cfg.kind, d_out=d_out, n_hooks=n_hooks, **settings.sae_config())
        self.sae = create_sae(sae_cfg, training=True, settings=settings).to(self.device)
        # The step's forward and loss, compiled once when asked (the backward is compiled with it).
        self._training_forward = torch.compile(self.sae.training_forward) if cfg.compile else self.sae.training_forward
        self.optimizer = _adam(self.sae, cfg.lr)
        self.total_steps = cfg.tokens // cfg.batch_size
        self.step = 0
        # Inputs are multiplied by this while training (normalize_activations): a number, or a crosscoder's one
        # factor per dimension (each hook on its own, as their norms differ by layer); a transcoder's targets by
        # target_scale.
        self.scale: float | torch.Tensor = 1.0
        self.target_scale: float | torch.Tensor = 1.0
        self.elapsed = 0.0
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.long, device=self.device)
        self.window_fired = torch.zeros(d_sae, dtype=torch.long, device=self.device)
        # Firing counts of the last complete dead window, and its length in tokens (None before the first).
        self._last_window: tuple[torch.Tensor, int] | None = None
        # Indices of the dead latents, refreshed every log_every steps (when the log syncs with the device
        # anyway) and after resampling, so that a step never waits for the device to count them.
        self._dead_latents = torch.zeros(0, dtype=torch.long, device=self.device)
        # The first step whose loss was NaN or infinite (-1: none), kept on the device and read only when the
        # log or a checkpoint syncs anyway; and the step of the last checkpoint written (a good one).
        self._first_nonfinite = torch.full((), -1, dtype=torch.long, device=self.device)
        self._checkpoint_step: int | None = None
        self.resume_step: int | None = None  # resume from the checkpoint of this step (default: the newest)
        self.resampled = 0   # latents re-initialised so far (dead_latent_remedy resample)
        # Called with the run folder once a checkpoint is written (checkpoint.pt, the previous one renamed to
        # checkpoint.prev.pt, metrics.jsonl): a run folder at a URL uploads them.
        self.on_checkpoint: Callable[[Path], None] | None = None
        self._stop_requested = False
        self._session: _Session | None = None

    # --- public ------------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Finish the current step, write a checkpoint and return (what Ctrl-C does)."""
        self._stop_requested = True

    def run(self, resume: bool = False, on_step=None) -> TrainResult:
        self.open(resume)
        with _sigint_requests_stop(self):
            completed = self._loop(on_step)
        return self.close(completed)

    def open(self, resume: bool = False, progress: bool | None = None) -> None:
        """Start the run, or continue it from its checkpoint; ``progress`` (default cfg.progress): its bar."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self._load_checkpoint()
        else:
            self._initialize()
            self.dp.broadcast_from_main(self.sae)
            if self.dp.is_main:
                (self.run_dir / METRICS_FILE).write_text("")
        bar = tqdm(total=self.total_steps * cfg.batch_size, initial=self.step * cfg.batch_size, unit="tok",
                   unit_scale=True, desc="training",
                   disable=not self.dp.is_main or not (cfg.progress if progress is None else progress),
                   dynamic_ncols=True)
        every = cfg.checkpoint_every_tokens
        metrics_path = self.run_dir / METRICS_FILE if self.dp.is_main else os.devnull  # rank 0 writes the log
        self._session = _Session(batches=self.buffer.batches(), metrics_file=open(metrics_path, "a"),
                                 bar=bar, next_checkpoint=(self.step * cfg.batch_size // every + 1) * every)

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    def advance(self) -> None:
        """One optimiser step on the next batch; then the log line and checkpoint when they fall due."""
        cfg, s = self.cfg, self._session
        t_start = time.perf_counter()
        if self.step % cfg.log_every == 0:
            self._refresh_dead_latents()
        x, target = self._scaled(next(s.batches))  # this rank's share of the batch
        parts = self._train_step(x, target)
        self.step += 1
        if self._resample_due():
            self._resample(s.batches)
        for name, value in parts.items():
            s.totals[name] = s.totals.get(name, 0.0) + value
        s.steps_in_log += 1
        s.bar.update(cfg.batch_size)
        if self.step % cfg.log_every == 0 or self.done:
            s.seconds_in_log += time.perf_counter() - t_start
            self.elapsed += s.seconds_in_log
            record = self._log_record(self.dp.mean_over_ranks(s.totals), s.steps_in_log, s.seconds_in_log)
            s.metrics_file.write(json.dumps(record) + "\n")
            s.metrics_file.flush()
            self._stop_if_diverged()
            self.tracker.log_metrics(record)
            s.bar.set_postfix(loss=f"{record['loss']:.4f}", L0=f"{record['l0']:.1f}",
                              FVU=f"{record['fvu']:.3f}", dead=f"{record['dead_fraction']:.2f}")
            s.totals, s.steps_in_log, s.seconds_in_log = {}, 0, 0.0
            t_start = time.perf_counter()
        if self.step * cfg.batch_size >= s.next_checkpoint:
            self._save_checkpoint()
            s.next_checkpoint += cfg.checkpoint_every_tokens
        s.seconds_in_log += time.perf_counter() - t_start

    def close(self, completed: bool = True) -> TrainResult:
        """End the session: write the checkpoint (resumable when not ``completed``) and return the result."""
        s, self._session = self._session, None
        self.elapsed += s.seconds_in_log
        s.metrics_file.close()
        s.bar.close()
        self._save_checkpoint()
        return TrainResult(sae=self.export_sae(), completed=completed, steps=self.step,
                           tokens=self.step * self.cfg.batch_size, seconds=self.elapsed,
                           firing_frequency=self._window_frequency(), dead_fraction=self._dead_fraction())

    def export_sae(self) -> SAE:
        """A copy of the inference SAE (on the CPU) that takes raw activations."""
        sae = self.sae.export()
        sae.fold_input_scale(self.scale, self.target_scale)
        return sae.eval()

    def _scaled(self, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A batch as ``(x, target)`` on the device in training scale: a transcoder's view gives both, an SAE's
        its input alone (target None: the input is the target)."""
        x, target = batch if isinstance(batch, tuple) else (batch, None)
        x = x.to(self.device, non_blocking=True) * self.scale
        return x, None if target is None else target.to(self.device, non_blocking=True) * self.target_scale

    # --- the loop ----------------------------------------------------------------------------------
    def _initialize(self) -> None:
        peeked = self.buffer.peek(INIT_SAMPLE_ROWS)
        sample, target = peeked if isinstance(peeked, tuple) else (peeked, None)
        if self.cfg.normalize_activations:
            # Mean norm sqrt(d) makes learning rates and loss weights transfer across models and layers.
            self.scale = self._scale_for(sample)
            self.target_scale = self.scale if target is None else self._scale_for(target)
        # Rank 0's sample decides (its parameters are broadcast).
        self.scale, self.target_scale = self.dp.from_main(self.scale), self.dp.from_main(self.target_scale)
        generator = torch.Generator().manual_seed(self.cfg.seed)
        x, target = self._scaled(peeked)
        self.sae.initialize(x.cpu(), self.cfg.b_dec_init, generator, fit=self.cfg.fit_init,
                            target=None if target is None else target.cpu())
        code_scale = self.dp.from_main(self.sae.code_scale)
        for group in self.optimizer.param_groups:
            group["lr_scale"] = code_scale if group["in_codes"] else 1.0

    def _scale_for(self, sample: torch.Tensor) -> float | torch.Tensor:
        """The factor that gives ``sample``'s rows mean norm sqrt(width); a crosscoder's or CLT's, one per column,
        each hook's block scaled on its own (their norms differ by layer)."""
        if self.sae.cfg.n_hooks == 1:
            return _norm_scale(sample)
        return torch.cat([torch.full((part.shape[1],), _norm_scale(part))
                          for part in sample.chunk(self.sae.cfg.n_hooks, dim=1)]).to(self.device)

    def _loop(self, on_step) -> bool:
        while not self.done:
            if self.dp.agree_to_stop(self._stop_requested, self.step, self.cfg.log_every):
                return False
            self.advance()
            if on_step is not None:
                on_step(self)
        return True

    def _train_step(self, x: torch.Tensor, target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        lr = self._lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        warmup = min(1.0, self.step / max(1.0, cfg.l1_warmup_fraction * self.total_steps))
        info = TrainStep(penalty_scale=warmup, remedy=cfg.remedy, dead_latents=self._dead_latents,
                         data_parallel=self.dp if self.dp.active else None)
        # An SAE's call leaves target out, so architectures written before transcoders (x, step) still train.
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.autocast):
            out = self._training_forward(x, info) if target is None else self._training_forward(x, info, target)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.dp.average_gradients(self.sae.parameters())
        self.sae.mask_gradients()
        self.sae.constrain_gradients()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.sae.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.sae.constrain_weights()
        # Counted over the whole batch (after_step sees that), so that every rank sees the same dead latents.
        out.fired, batch_tokens = self.dp.sum_counts(out.fired), len(x) * self.dp.world_size
        self.sae.after_step(out, info)
        self._track_firing(out.fired, batch_tokens)
        with torch.no_grad():
            parts = {name: value.detach() for name, value in out.parts.items()}
            parts["loss"] = out.loss.detach()
            self._first_nonfinite.masked_fill_((self._first_nonfinite < 0) & ~torch.isfinite(parts["loss"]), self.step)
            parts["l0"] = out.fired.sum() / batch_tokens
            target = x if target is None else target
            parts["fvu"] = normalized_error(out.x_hat.float() - target, target, info.data_parallel)
        return parts

    # --- resampling dead latents (Towards Monosemanticity, 2023) -------------------------------------
    def _resample_due(self) -> bool:
        """After the step that crosses a multiple of resample_every_tokens, before the rate decay starts."""
        cfg = self.cfg
        if cfg.remedy != "resample" or self.step >= int((1 - cfg.lr_decay_fraction) * self.total_steps):
            return False
        every, bs = cfg.resample_every_tokens, cfg.batch_size
        return self.step * bs // every > (self.step - 1) * bs // every

    def _resample(self, batches) -> None:
        n_batches = max(1, math.ceil(self.cfg.resample_sample_tokens / self.cfg.batch_size))
        # Every rank draws from the same inputs (each global batch: all ranks' shares), so their SAEs stay equal.
        drawn = [self._scaled(next(batches)) for _ in range(n_batches)]
        inputs = torch.cat([self.dp.gather(x) for x, _ in drawn])
        targets = None if drawn[0][1] is None else torch.cat([self.dp.gather(target) for _, target in drawn])
        self.resample_dead_latents(inputs, targets)

    @torch.no_grad()
    def resample_dead_latents(self, inputs: torch.Tensor, targets: torch.Tensor | None = None) -> int:
        """Re-initialise the dead latents toward badly reconstructed ``inputs`` (in training scale; a
        transcoder's ``targets`` too).

        Each dead latent takes one input, drawn with probability proportional to the square of its
        squared reconstruction error: its decoder row becomes the input's direction (a transcoder's: the
        target's), its encoder column the input's direction times 0.2 x the mean encoder norm of live
        latents, its biases their initial values; Adam's moments for those slices are zeroed and the latent
        gets a fresh dead window. The draw uses a generator seeded from (seed, step), so a resumed run
        repeats it. Returns the number of latents re-initialised.
        """
        dead = (self.tokens_since_fired >= self.cfg.dead_window_tokens).nonzero().squeeze(1)
        if len(dead) == 0:
            return 0
        was_training = self.sae.training
        self.sae.eval()
        targets = inputs if targets is None else targets
        losses = torch.cat([(self.sae(chunk) - wanted).pow(2).sum(-1)
                            for chunk, wanted in zip(inputs.split(4096), targets.split(4096))])
        self.sae.train(was_training)
        weights = losses.double().pow(2).cpu()
        if not bool(weights.sum() > 0) or not bool(torch.isfinite(weights).all()):
            weights = torch.ones_like(weights)
        chosen = torch.multinomial(weights, len(dead), replacement=True, generator=self._step_generator("resample"))
        chosen = chosen.to(inputs.device)
        picked, picked_targets = inputs[chosen], targets[chosen]
        directions = picked / picked.norm(dim=1, keepdim=True).clamp_min(1e-8)
        target_directions = picked_targets / picked_targets.norm(dim=1, keepdim=True).clamp_min(1e-8)
        alive = self.tokens_since_fired < self.cfg.dead_window_tokens
        encoder_norms = self.sae.W_enc.norm(dim=0)
        mean_norm = float(encoder_norms[alive].mean()) if bool(alive.any()) else float(encoder_norms.mean())
        self.sae.reinitialize_latents(dead, target_directions, RESAMPLE_ENCODER_SCALE * mean_norm, directions)
        self._reset_optimizer_rows(dead)
        self.tokens_since_fired[dead] = 0
        self.resampled += len(dead)
        self._refresh_dead_latents()
        return len(dead)

    def _reset_optimizer_rows(self, latents: torch.Tensor) -> None:
        for name, axis in self.sae.latent_axes().items():
            state = self.optimizer.state.get(getattr(self.sae, name), {})
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if key in state:
                    state[key].index_fill_(axis, latents.to(state[key].device), 0.0)

    def _step_generator(self, purpose: str) -> torch.Generator:
        digest = hashlib.sha256(f"{self.cfg.seed}:{purpose}:{self.step}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))

    def _refresh_dead_latents(self) -> None:
        self._dead_latents = (self.tokens_since_fired >= self.cfg.dead_window_tokens).nonzero().squeeze(1)

    def _track_firing(self, fired: torch.Tensor, n_tokens: int) -> None:
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired.masked_fill_(fired > 0, 0)  # not boolean indexing: that waits for the device
        self.window_fired += fired
        # The frequency window restarts every dead window, so it reflects recent training.
        if (self.step + 1) * self.cfg.batch_size % self.cfg.dead_window_tokens < n_tokens:
            self._last_window = self.window_fired.clone(), self.cfg.dead_window_tokens
            self.tracker.log_density(self._window_frequency(), self.step + 1)
            self.window_fired.zero_()

    def _dead_fraction(self) -> float:
        return float((self.tokens_since_fired >= self.cfg.dead_window_tokens).float().mean())

    def _window_frequency(self) -> torch.Tensor:
        counts, tokens = self._last_window or (self.window_fired, max(1, self.step * self.cfg.batch_size))
        return (counts.float() / tokens).cpu()

    def _lr_at(self, step: int) -> float:
        cfg, total = self.cfg, self.total_steps
        warmup = max(1, int(cfg.lr_warmup_fraction * total))
        decay_start = int((1 - cfg.lr_decay_fraction) * total)
        if step < warmup:
            return cfg.lr * (step + 1) / warmup
        if step >= decay_start and total > decay_start:
            return cfg.lr * (total - step) / (total - decay_start)
        return cfg.lr

    def _log_record(self, totals: dict, steps: int, seconds: float) -> dict:
        record = {"step": self.step, "tokens": self.step * self.cfg.batch_size}
        record.update({name: float(value) / steps for name, value in totals.items()})
        record["dead_fraction"] = self._dead_fraction()
        if self.cfg.remedy == "resample":
            record["resampled_latents"] = self.resampled
        record["lr"] = self._lr_at(self.step - 1)
        record["tokens_per_second"] = steps * self.cfg.batch_size / max(seconds, 1e-9)
        record["elapsed"] = self.elapsed
        return record

    # --- checkpoints -------------------------------------------------------------------------------
    def _stop_if_diverged(self) -> None:
        """After a NaN or infinite loss the weights are lost: stop before they reach a checkpoint or final/."""
        step = int(self._first_nonfinite)
        if step < 0:
            return
        kept = (f"the last good checkpoint (step {self._checkpoint_step}) is intact: resume it with a lower --lr "
                f"(`saelab train --resume {self.run_dir} --lr ...`)" if self._checkpoint_step is not None
                else "no checkpoint had been written yet: start again with a lower --lr")
        raise TrainingDivergedError(f"{self.run_dir}: the loss became NaN or infinite at step {step}; training "
                                    f"stopped and nothing was saved from it; {kept}.")

    def _save_checkpoint(self) -> None:
        self._stop_if_diverged()
        self._checkpoint_step = self.step
        positions = self._buffer_positions()
        if not self.dp.is_main:  # every rank holds the same SAE; one copy is written, with every rank's position
            return
        state = {
            "config": self.cfg.as_dict(), "sae_config": asdict(self.sae.cfg), "sae": self.sae.state_dict(),
            "optimizer": self.optimizer.state_dict(), "step": self.step, "scale": self.scale,
            "target_scale": self.target_scale,
            "buffer": positions[0], "world_size": self.dp.world_size,
            **({"buffer_ranks": positions} if self.dp.active else {}), "tokens_since_fired": self.tokens_since_fired,
            "window_fired": self.window_fired, "last_window": self._last_window, "dead_latents": self._dead_latents,
            "elapsed": self.elapsed, "resampled": self.resampled,
        }
        path = self.run_dir / CHECKPOINT_FILE
        tmp = path.with_suffix(".tmp")
        with writing(path, "the checkpoint", "the previous checkpoint is intact: free some disk space and resume "
                     f"(`saelab train --resume {self.run_dir}`)", leftovers=[tmp]):
            torch.save(state, tmp)
        if path.exists():
            os.replace(path, self.run_dir / PREVIOUS_CHECKPOINT_FILE)
        os.replace(tmp, path)  # atomic: an interrupted write leaves the previous checkpoints intact
        if self.on_checkpoint is not None:
            self.on_checkpoint(self.run_dir)

    def _buffer_positions(self) -> list[dict]:
        """Every rank's buffer position (each reads its own shard of the data), in rank order."""
        own = self.buffer.state_dict()
        if not self.dp.active:
            return [own]
        names = list(own)
        rows = self.dp.gather(torch.tensor([[int(own[n]) for n in names]], dtype=torch.long,
                                           device=self.dp.comm_device))
        return [dict(zip(names, map(int, row))) for row in rows.tolist()]

    def _load_checkpoint(self) -> None:
        available = checkpoint_steps(self.run_dir)
        if not available:
            raise FileNotFoundError(f"no checkpoint in {self.run_dir}; start the run without --resume")
        step = max(available) if self.resume_step is None else self.resume_step
        state = read_checkpoint(available[step], self.device)
        saved = TrainConfig(**state["config"])
        for name in (*fields_with(TrainConfig, "fixed_on_resume"), *fields_with(type(self.cfg.settings),
                                                                                  "fixed_on_resume")):
            if getattr(saved, name) != getattr(self.cfg, name):
                raise ValueError(f"cannot resume: {name} was {getattr(saved, name)!r} in the checkpoint, now "
                                 f"{getattr(self.cfg, name)!r}; resume with the run's own config")
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.scale, self.elapsed = state["step"], state["scale"], state["elapsed"]
        self.target_scale = state.get("target_scale", self.scale)
        self._checkpoint_step = self.step
        self.resampled = state.get("resampled", 0)
        trained_by = state.get("world_size", 1)
        if trained_by != self.dp.world_size:
            launch = f"torchrun --nproc_per_node {trained_by} -m saelab train" if trained_by > 1 else "saelab train"
            raise ValueError(f"cannot resume {self.run_dir} with {self.dp.world_size} process"
                             f"{'es' if self.dp.world_size > 1 else ''}: it was trained with {trained_by}, each "
                             f"reading its own share of the data; resume it with `{launch} --resume ...`")
        self.buffer.load_state_dict(state["buffer_ranks"][self.dp.rank] if self.dp.active else state["buffer"])
        self.tokens_since_fired.copy_(state["tokens_since_fired"])
        self.window_fired.copy_(state["window_fired"])
        self._last_window = state["last_window"]
        self._dead_latents = state["dead_latents"]
        if self.dp.is_main:
            _truncate_metrics(self.run_dir / METRICS_FILE, self.step)


def _norm_scale(sample: torch.Tensor) -> float:
    """The factor that gives ``sample``'s rows mean norm sqrt(width)."""
    return math.sqrt(sample.shape[1]) / sample.float().norm(dim=1).mean().clamp_min(1e-8).item()


def training_buffer(source: ActivationSource, cfg: TrainConfig, dp: DataParallel, device) -> ActivationBuffer:
    """The shuffling buffer a process trains from: under torchrun its own shard of the source's units, with
    its share of the buffer and of every batch (the ranks' batches make up the global batch)."""
    return ActivationBuffer(shard_of(source, dp.rank, dp.world_size), dp.share(cfg.block_tokens),
                            dp.share(cfg.batch_size), cfg.seed, progress=cfg.progress and dp.is_main, device=device)


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the message says at which step and what was kept."""


def has_checkpoint(run_dir) -> bool:
    return any((Path(run_dir) / name).exists() for name in (CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE))


def checkpoint_steps(run_dir) -> dict[int, Path]:
    """The checkpoints a run folder holds (the newest and the one before it), by training step."""
    found = {}
    for name in (PREVIOUS_CHECKPOINT_FILE, CHECKPOINT_FILE):
        path = Path(run_dir) / name
        if path.exists():
            found[int(read_checkpoint(path, mmap=True)["step"])] = path  # memory-mapped: only the step is read
    return found


def read_checkpoint(path, device: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """A checkpoint's state, read so that nothing in the file can run code: torch's ``weights_only`` loader
    takes tensors and plain data (dicts, lists, numbers, strings) and refuses anything else."""
    try:
        return torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, OSError) as err:
        raise FileFormatError(f"{path} is not a readable checkpoint ({str(err).splitlines()[0][:120]}): it was damaged "
                              "or cut short (saelab writes checkpoints atomically, so something else changed it). "
                              "Start the run afresh with --overwrite.") from None
    except pickle.UnpicklingError as err:
        named = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f" (it calls {named[1]})" if named else ""
        raise FileFormatError(f"{path} holds objects other than tensors and plain data{what}, which saelab does not "
                         "load: loading them could run code. Start the run afresh with --overwrite, or resume "
                         "only checkpoints written by saelab.") from None


def _adam(sae: SAE, lr: float) -> torch.optim.Adam:
    """Adam with the fused kernel where this torch has one (one pass over each tensor per step). Two parameter
    groups: the parameters in code units (``sae.code_parameters()``; their rate is scaled by ``lr_scale``, set
    from the fitted start's ``code_scale``, and kept in checkpoints) and the rest."""
    in_codes = set(sae.code_parameters())
    groups = [{"params": [p for name, p in sae.named_parameters() if (name in in_codes) == codes], "lr_scale": 1.0,
               "in_codes": codes} for codes in (True, False)]
    groups = [group for group in groups if group["params"]]
    try:
        return torch.optim.Adam(groups, lr=lr, betas=(0.9, 0.999), fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(groups, lr=lr, betas=(0.9, 0.999))


@contextmanager
def _sigint_requests_stop(trainer: Trainer):
    """While training, Ctrl-C finishes the step and checkpoints instead of killing the process."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        print("\nsaelab: stopping after this step and writing a checkpoint (Ctrl-C again aborts)", flush=True)
        signal.signal(signal.SIGINT, previous)
        trainer.request_stop()

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines logged after the checkpoint, so a resumed run's log has no duplicates."""
    if not path.exists():
        return
    kept = [line for line, record in zip(*_metric_lines(path)) if record["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _metric_lines(path: Path) -> tuple[list[str], list[dict]]:
    """The lines of metrics.jsonl and their records, without a line cut short by a kill mid-write."""
    lines, records = [], []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            lines.append(line)
            records.append(record)
    return lines, records


def read_metrics(path) -> list[dict]:
    """The records of a run's metrics.jsonl (a torn last line, from a kill mid-write, left out)."""
    return _metric_lines(Path(path))[1]
