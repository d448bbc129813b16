"""Data-parallel training: 2 CPU processes (gloo) give the SAE that one process gives on the same global batches."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from conftest import synthetic_activations
from saelab.data import TensorSource
from saelab.training import TrainConfig, Trainer
from saelab.distributed import DataParallel, data_parallel_from_env, release_process_group, round_robin

# Each architecture's batch-wide statistics take another path under DDP: FVU-normalised errors and AuxK
# (topk), the batch-wide top k and its threshold (batchtopk, matryoshka), token means (standard), the target-L0
# controller fed by the firing counts (jumprelu). The standard SAE runs 16 steps, not 48: its L1 piles
# pre-activations up at the ReLU's kink, and sooner or later one lies within fp32 rounding of 0, where the
# two summation orders (one batch, two half batches) put it on different sides (here at step 32).
CONFIGS = {
    "topk": dict(architecture="topk", k=3),
    "batchtopk": dict(architecture="batchtopk", k=3),
    "matryoshka": dict(architecture="matryoshka_batchtopk", k=3, matryoshka_widths="12,24"),
    "standard": dict(architecture="standard", l1_coefficient=1.0, tokens=4096),
    "jumprelu": dict(architecture="jumprelu", target_l0=4.0),
}


def _config(folder, **overrides) -> TrainConfig:
    # A short dead window, so latents die and AuxK / the dead fraction are exercised; several buffer blocks.
    base = dict(out=str(folder), d_sae=48, tokens=12_288, batch_size=256, lr=3e-3, buffer_tokens=2048,
                dead_window_tokens=1024, checkpoint_every_tokens=4096, log_every=8, progress=False, seed=0,
                device="cpu")
    return TrainConfig(**{**base, **overrides})


def _train(folder, data_parallel: DataParallel, **overrides):
    data, _ = synthetic_activations(6_000, d_in=16, n_features=32, active=3)
    return Trainer(_config(folder, **overrides), TensorSource(data, rows_per_unit=500), folder,
                   data_parallel=data_parallel).run()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, root: str) -> None:
    """One torchrun-like process: the environment torchrun would set, then every config in CONFIGS."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dp = data_parallel_from_env("cpu")
    try:
        for name, overrides in CONFIGS.items():
            result = _train(f"{root}/{name}", dp, **overrides)
            if dp.is_main:
                torch.save(result.sae.state_dict(), f"{root}/{name}/sae.pt")
    finally:
        release_process_group()


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    mp.spawn(_rank_main, args=(2, _free_port(), str(root)), nprocs=2, join=True)
    return root


@pytest.mark.subprocess
@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_gloo_processes_train_the_single_process_sae(two_process_runs, tmp_path, name):
    single = _train(tmp_path, DataParallel(), **CONFIGS[name]).sae.state_dict()
    ddp = torch.load(two_process_runs / name / "sae.pt")
    assert single.keys() == ddp.keys()
    for key, tensor in single.items():
        torch.testing.assert_close(ddp[key], tensor, rtol=1e-4, atol=1e-5, msg=f"{name} {key}")
    # The run folder is rank 0's alone: one metrics line per log step, the same steps as one process.
    records = [json.loads(line) for line in (two_process_runs / name / "metrics.jsonl").read_text().splitlines()]
    single_records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [r["step"] for r in single_records]
    for ours, theirs in zip(records, single_records):
        for key in ("loss", "l0", "fvu", "dead_fraction", "lr"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-3, abs=1e-5), (name, key, ours["step"])


def test_shards_of_a_batch_make_up_the_batch():
    batch = torch.arange(24.0).view(12, 2)
    shards = [DataParallel(rank=r, world_size=3).shard(batch) for r in range(3)]
    assert all(len(s) == 4 for s in shards)
    assert torch.equal(torch.cat(shards), batch)
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        DataParallel(rank=0, world_size=3).check_batch_size(1024)


def test_round_robin_gives_each_sae_to_exactly_one_rank():
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(5)]
    shares = [round_robin(hooks, rank, 3) for rank in range(3)]
    assert shares == [[hooks[0], hooks[3]], [hooks[1], hooks[4]], [hooks[2]]]
    assert round_robin(hooks[:1], 1, 2) == []
    with pytest.raises(ValueError, match="rank 2"):
        round_robin(hooks, 2, 2)


def test_without_torchrun_training_is_single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    dp = data_parallel_from_env(None)
    assert not dp.active and dp.is_main and dp.world_size == 1


# --- the command line under torchrun, on the tiny Llama ------------------------------------------------
TINY_RUN = ["--dataset", "python-docs", "--d-sae", "64", "--k", "4", "--tokens", "4096", "--batch-size", "256",
            "--buffer-tokens", "2048", "--lm-batch-size", "4", "--context-size", "64", "--eval-tokens", "0",
            "--log-every", "4", "--dead-window-tokens", "2048", "--no-progress", "--device", "cpu"]
TWO_HOOKS = "blocks.0.hook_resid_post,blocks.1.hook_resid_post"


def torchrun_train(*args: str) -> None:
    """``torchrun --nproc_per_node 2 -m saelab train ARGS`` on this machine's CPU (gloo)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "-m", "saelab", "train", *args]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def final_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(run_dir / "final" / "sae_weights.safetensors")


@pytest.mark.subprocess
def test_torchrun_train_gives_the_single_process_sae(tiny_model_dir, tmp_path):
    from saelab.cli import main

    model = ["--model", str(tiny_model_dir), "--hook", "blocks.1.hook_resid_post", *TINY_RUN]
    assert main(["train", *model, "--out", str(tmp_path / "one")]) == 0
    torchrun_train(*model, "--out", str(tmp_path / "two"))
    one, two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.subprocess
def test_torchrun_spreads_the_saes_of_a_hook_list_over_the_processes(tiny_model_dir, tmp_path):
    from saelab.cli import main

    model = ["--model", str(tiny_model_dir), "--hook", TWO_HOOKS, *TINY_RUN]
    assert main(["train", *model, "--out", str(tmp_path / "one")]) == 0
    torchrun_train(*model, "--out", str(tmp_path / "two"), "--distribute", "saes")
    runs = json.loads((tmp_path / "two" / "multi.json").read_text())["runs"]
    assert runs == json.loads((tmp_path / "one" / "multi.json").read_text())["runs"] and len(runs) == 2
    for run in runs:  # each SAE trained whole by one rank: the same as trained in one process
        one, two = final_weights(tmp_path / "one" / run), final_weights(tmp_path / "two" / run)
        for key in one:
            torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-7, msg=f"{run} {key}")
