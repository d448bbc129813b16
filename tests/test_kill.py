"""Killed at any moment (kill -9, seeded random times), `saelab cache`, `saelab train` (one SAE and several)
and `saelab sweep` finish when run again (or resumed) with the same files an uninterrupted run gives."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

DATA_ARGS = ["--context-size", "32", "--lm-batch-size", "8", "--no-progress"]
TRAIN_ARGS = [*DATA_ARGS, "--tokens", "16384", "--k", "4", "--batch-size", "256", "--buffer-tokens", "4096",
              "--eval-tokens", "256", "--expansion", "4", "--log-every", "4", "--checkpoint-every-tokens", "2048",
              "--hook", "blocks.1.hook_resid_post"]
KILLS = 3  # kill points per command, drawn from a seeded generator


def saelab(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "saelab", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def finished(args: list[str]) -> float:
    start = time.perf_counter()
    process = saelab(args)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-2000:]
    return time.perf_counter() - start


def killed_then_finished(args: list[str], resume_args, after: float) -> None:
    """Run, SIGKILL after ``after`` seconds (if still running), then finish: ``resume_args()`` (computed after
    the kill, from what is on disk) or the same command again."""
    process = saelab(args)
    try:
        process.wait(timeout=after)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finished(resume_args() or args)


def same_files(one: Path, other: Path, names: list[str]) -> None:
    for name in names:
        assert (one / name).read_bytes() == (other / name).read_bytes(), name


SAE_FILES = ["final/sae_weights.safetensors", "final/sparsity.safetensors", "final/cfg.json"]


def kill_points(duration: float, seed: int) -> list[float]:
    """Times spread over the part of a run after start-up (imports and model loading take the first ~third)."""
    rng = random.Random(seed)
    return [rng.uniform(0.3, 0.95) * duration for _ in range(KILLS)]


@pytest.mark.parametrize("hooks", ["blocks.1.hook_resid_post", "blocks.0.hook_resid_post,blocks.1.hook_resid_post"])
def test_train_killed_anywhere_resumes_to_the_same_sae(tiny_model_dir, text_file, tmp_path, hooks):
    args = lambda out: ["train", "--model", str(tiny_model_dir), "--dataset", str(text_file), *TRAIN_ARGS,
                        "--hook", hooks, "--out", str(out)]
    duration = finished(args(tmp_path / "whole"))
    runs = [""] if "," not in hooks else [f"{hook}-topk-k4" for hook in hooks.split(",")]
    for n, after in enumerate(kill_points(duration, seed=len(hooks))):
        out = tmp_path / f"killed{n}"
        has_run = lambda: any(out.rglob("checkpoint.pt"))  # else it stopped before its first checkpoint: run again
        killed_then_finished(args(out), lambda: ["train", "--resume", str(out)] if has_run() else None, after)
        for run in runs:
            same_files(tmp_path / "whole" / run, out / run, SAE_FILES)


def test_cache_killed_anywhere_continues_to_the_same_files(tiny_model_dir, text_file, tmp_path):
    args = lambda out: ["cache", "--model", str(tiny_model_dir), "--dataset", str(text_file), *DATA_ARGS,
                        "--hooks", "blocks.0.hook_resid_post,blocks.1.hook_resid_post", "--tokens", "16384",
                        "--shard-tokens", "1024", "--out", str(out)]
    duration = finished(args(tmp_path / "whole"))
    whole = sorted(str(p.relative_to(tmp_path / "whole")) for p in (tmp_path / "whole").rglob("*") if p.is_file())
    for n, after in enumerate(kill_points(duration, seed=7)):
        out = tmp_path / f"killed{n}"
        killed_then_finished(args(out), lambda: None, after)
        assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == whole
        same_files(tmp_path / "whole", out, whole)


def test_sweep_killed_anywhere_finishes_with_the_same_saes(tiny_model_dir, text_file, tmp_path):
    args = lambda out: ["sweep", "--model", str(tiny_model_dir), "--dataset", str(text_file), *TRAIN_ARGS,
                        "--architectures", "topk,standard", "--k", "2,4", "--l1-coefficient", "1", "--out", str(out)]
    duration = finished(args(tmp_path / "whole"))
    for n, after in enumerate(kill_points(duration, seed=11)):
        out = tmp_path / f"killed{n}"
        killed_then_finished(args(out), lambda: None, after)
        for point in ("topk-k2", "topk-k4", "standard-l1_1"):
            same_files(tmp_path / "whole" / point, out / point, SAE_FILES)
