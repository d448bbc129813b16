"""Data-parallel training: each of 2 CPU processes (gloo) reads its own shard of the data; together they give
the SAE one process gives on the same global batches (rank 0's batch then rank 1's), and run the model once
over the text between them."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from conftest import synthetic_activations
from saelab.data import TensorSource
from saelab.data.activations import NormFilter, shard_of
from saelab.distributed import DataParallel, data_parallel_from_env, release_process_group, round_robin
from saelab.training import TrainConfig, Trainer
from saelab.training.trainer import training_buffer

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
    "resample": dict(architecture="topk", k=3, d_sae=128, tokens=4096, dead_window_tokens=512,
                     dead_latent_remedy="resample", resample_every_tokens=1024, resample_sample_tokens=512),
}


class RanksInOneProcess:
    """What 2 data-parallel ranks read, in one process: each step rank 0's batch then rank 1's (the global batch
    the ranks train on together), the SAE initialised from rank 0's rows as under torchrun."""

    def __init__(self, source, cfg: TrainConfig, world_size: int = 2):
        self.buffers = [training_buffer(source, cfg, DataParallel(rank=rank, world_size=world_size), "cpu")
                        for rank in range(world_size)]

    def batches(self):
        streams = [buffer.batches() for buffer in self.buffers]
        while True:
            yield torch.cat([next(stream) for stream in streams])

    def peek(self, rows: int) -> torch.Tensor:
        return self.buffers[0].peek(rows)

    def state_dict(self) -> dict:
        return self.buffers[0].state_dict()


def _config(folder, **overrides) -> TrainConfig:
    # A short dead window, so latents die and AuxK / the dead fraction are exercised; several buffer blocks.
    base = dict(out=str(folder), d_sae=48, tokens=12_288, batch_size=256, lr=3e-3, buffer_tokens=2048,
                dead_window_tokens=1024, checkpoint_every_tokens=4096, log_every=8, progress=False, seed=0,
                device="cpu")
    return TrainConfig(**{**base, **overrides})


def _source() -> TensorSource:
    data, _ = synthetic_activations(6_000, d_in=16, n_features=32, active=3)
    return TensorSource(data, rows_per_unit=500)


def _train(folder, data_parallel: DataParallel, **overrides):
    return Trainer(_config(folder, **overrides), _source(), folder, data_parallel=data_parallel).run()


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
        # Stopped (as by Ctrl-C) after step 12, so at step 16 on both ranks, then resumed by both.
        cfg = _config(f"{root}/resumed", **CONFIGS["topk"])
        stopper = Trainer(cfg, _source(), cfg.out, data_parallel=dp)
        assert not stopper.run(on_step=lambda t: t.step >= 12 and t.request_stop()).completed
        result = Trainer(cfg, _source(), cfg.out, data_parallel=dp).run(resume=True)
        if dp.is_main:
            torch.save(result.sae.state_dict(), f"{root}/resumed/sae.pt")
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
    cfg = _config(tmp_path, **CONFIGS[name])
    single = Trainer(cfg, _source(), tmp_path, buffer=RanksInOneProcess(_source(), cfg)).run().sae.state_dict()
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


@pytest.mark.subprocess
def test_a_two_process_run_resumes_exactly_on_two_processes_only(two_process_runs, tmp_path):
    resumed, whole = (torch.load(two_process_runs / name / "sae.pt") for name in ("resumed", "topk"))
    for key in whole:
        assert torch.equal(resumed[key], whole[key]), key
    # Each rank read its own shard: one process cannot carry on from their positions.
    cfg = _config(two_process_runs / "resumed", **CONFIGS["topk"])
    with pytest.raises(ValueError, match="with 1 process: it was trained with 2.*torchrun --nproc_per_node 2"):
        Trainer(cfg, _source(), cfg.out).run(resume=True)


@pytest.mark.subprocess
def test_resampling_draws_the_same_inputs_on_every_rank(two_process_runs):
    records = [json.loads(line) for line in (two_process_runs / "resample" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["resampled_latents"] > 0  # the resample case above did resample, on both ranks alike


def test_the_shards_of_a_source_partition_its_units():
    source = TensorSource(torch.arange(50.0).view(25, 2), rows_per_unit=4)  # 7 units, the last of 1 row
    whole = list(source.units(0))
    shards = [list(shard_of(source, rank, 3).units(0)) for rank in range(3)]
    assert [len(s) for s in shards] == [3, 2, 2]
    for rank, shard in enumerate(shards):
        assert all(torch.equal(unit, whole[rank + 3 * i]) for i, unit in enumerate(shard))
    assert torch.equal(next(shard_of(source, 1, 3).units(1)), whole[4])  # a shard's unit i is global unit r + 3i
    assert torch.equal(next(shard_of(shard_of(source, 1, 2), 1, 2).units(0)), whole[3])  # shards of shards
    with pytest.raises(ValueError, match="shard 3"):
        shard_of(source, 3, 3)


def test_every_shard_filters_outliers_with_the_whole_sources_limits():
    rows = torch.ones(40, 4)
    rows[10:20] *= 3.0  # unit 1 alone: its own median would keep its rows, unit 0's limit drops them
    filtered = NormFilter(TensorSource(rows, rows_per_unit=10), multiple=2.0)
    assert [len(u) for u in shard_of(filtered, 1, 2).units(0)] == [0, 10]


def test_each_rank_buffers_and_batches_its_share(tmp_path):
    cfg = _config(tmp_path)
    buffer = training_buffer(_source(), cfg, DataParallel(rank=1, world_size=2), "cpu")
    assert (buffer.buffer_tokens, buffer.batch_size) == (1024, 128)
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


def torchrun(command: str, *args: str) -> str:
    """``torchrun --nproc_per_node 2 -m saelab COMMAND ARGS`` on this machine's CPU (gloo); its stderr."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
              str(_free_port()), "-m", "saelab", command, *args]
    done = subprocess.run(launch, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def torchrun_train(*args: str) -> str:
    return torchrun("train", *args)


def final_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(run_dir / "final" / "sae_weights.safetensors")


def forward_batches(log: str) -> dict[int, int]:
    """Each rank's count of forward batches, from the line it logs at the end of training."""
    import re

    return {int(rank): int(n.replace(",", "")) for rank, n in
            re.findall(r"rank (\d) of 2: ([\d,]+) forward batches", log)}


def _counting_rank_main(rank: int, world_size: int, port: int, root: str, model_dir: str) -> None:
    """One rank training on the tiny Llama through ``train``, counting the contexts its model runs on."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        contexts = _train_counting_contexts(model_dir, f"{root}/run")
        with open(f"{root}/contexts{rank}.json", "w") as f:
            json.dump(contexts, f)
    finally:
        release_process_group()


def _train_counting_contexts(model_dir: str, out: str) -> list[int]:
    from saelab.models import load_model
    from saelab.training import train

    model, tokenizer = load_model(model_dir, "cpu")
    seen = []  # every forward batch of contexts the model runs on (not the one-token width probe)
    model.model.embed_tokens.register_forward_pre_hook(
        lambda module, inputs: seen.append(inputs[0].tolist()) if inputs[0].shape[1] == 64 else None)
    cfg = TrainConfig(model=model_dir, hook="blocks.1.hook_resid_post", dataset="python-docs", d_sae=64, k=4,
                      tokens=8192, batch_size=256, buffer_tokens=1024, lm_batch_size=4, context_size=64,
                      eval_tokens=0, log_every=4, progress=False, device="cpu", out=out)
    train([cfg], model_and_tokenizer=(model, tokenizer), evaluate=False)
    return seen


@pytest.mark.subprocess
def test_each_rank_runs_the_model_on_its_own_half_of_the_contexts(tiny_model_dir, tmp_path):
    single = _train_counting_contexts(str(tiny_model_dir), str(tmp_path / "one"))
    mp.spawn(_counting_rank_main, args=(2, _free_port(), str(tmp_path), str(tiny_model_dir)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"contexts{rank}.json").read_text()) for rank in range(2)]
    # Rank r runs forward batches r, r + 2, r + 4, ... of the text, each about half as many as one process
    # runs (each fills its own buffer of half the size: together they may run a batch or two more).
    for rank, batches in enumerate(ranks):
        assert 0.4 * len(single) <= len(batches) <= 0.5 * len(single) + 2, (len(batches), len(single))
        ours = batches[:(len(single) - rank + 1) // 2]
        assert ours == single[rank::2][:len(ours)]


@pytest.mark.subprocess
def test_torchrun_train_reaches_the_single_process_quality(tiny_model_dir, tmp_path):
    from saelab.cli import main

    model = ["--model", str(tiny_model_dir), "--hook", "blocks.1.hook_resid_post", *TINY_RUN, "--tokens", "16384",
             "--eval-tokens", "2048"]
    assert main(["train", *model, "--out", str(tmp_path / "one")]) == 0
    log = torchrun_train(*model, "--out", str(tmp_path / "two"))
    counts = forward_batches(log)
    assert set(counts) == {0, 1} and all(n > 0 for n in counts.values()), log[-2000:]
    one, two = (json.loads((tmp_path / run / "eval.json").read_text()) for run in ("one", "two"))
    assert two["explained_variance"] == pytest.approx(one["explained_variance"], abs=0.03)
    assert two["l0"] == pytest.approx(one["l0"], rel=0.05)


CACHE_RUN = ["--dataset", "python-docs", "--hooks", TWO_HOOKS, "--tokens", "8192", "--context-size", "64",
             "--lm-batch-size", "4", "--shard-tokens", "512", "--no-progress", "--device", "cpu"]


@pytest.mark.subprocess
def test_a_two_process_cache_is_the_one_process_cache_and_trains_under_torchrun(tiny_model_dir, tmp_path):
    from saelab.cli import main

    model = ["--model", str(tiny_model_dir)]
    assert main(["cache", *model, *CACHE_RUN, "--out", str(tmp_path / "one")]) == 0
    torchrun("cache", *model, *CACHE_RUN, "--out", str(tmp_path / "two"))
    one, two = tmp_path / "one", tmp_path / "two"
    shards = sorted(p.relative_to(one) for p in one.rglob("*.npy"))
    assert shards == sorted(p.relative_to(two) for p in two.rglob("*.npy")) and len(shards) == 4 * 16
    for path in shards:  # the same shards, each written by one of the two ranks
        a, b = np.load(one / path), np.load(two / path)
        assert a.dtype == b.dtype and a.shape == b.shape, path
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=str(path))
    meta_one, meta_two = (json.loads((folder / "metadata.json").read_text()) for folder in (one, two))
    assert meta_one == meta_two and meta_two["complete"] and not (two / "progress").exists()

    log = torchrun_train("--activations", str(two), "--hook", "blocks.1.hook_resid_post", "--d-sae", "64", "--k",
                         "4", "--tokens", "4096", "--batch-size", "256", "--buffer-tokens", "1024", "--eval-tokens",
                         "512", "--no-progress", "--device", "cpu", "--out", str(tmp_path / "run"))
    assert "forward batches read from the cache" in log
    assert (tmp_path / "run" / "final" / "sae_weights.safetensors").exists()


def test_a_cache_shard_reads_only_its_own_forward_batches(tiny_model_dir, tmp_path):
    from saelab.cli import main
    from saelab.data.cache import ActivationCache

    assert main(["cache", "--model", str(tiny_model_dir), *CACHE_RUN, "--tokens", "2048", "--out",
                 str(tmp_path / "acts")]) == 0
    source = ActivationCache(tmp_path / "acts").source(["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"])
    whole = list(source.units(0))
    shards = [list(shard_of(source, rank, 2).units(0)) for rank in range(2)]
    assert len(whole) == 8 and [len(s) for s in shards] == [4, 4]
    for rank, shard in enumerate(shards):
        assert all(torch.equal(unit, whole[rank + 2 * i]) for i, unit in enumerate(shard))
    assert torch.equal(next(shard_of(source, 1, 2).units(2)), whole[5])


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
