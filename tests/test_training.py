"""The trainer on synthetic activations: recovers planted features, resumes exactly, is deterministic."""

import json
import math
import os

import pytest
import torch

from conftest import mean_max_cosine, synthetic_activations
from saelab.data import TensorSource
from saelab.training import TrainConfig, Trainer


def config(tmp_path, **overrides):
    base = dict(out=str(tmp_path), architecture="topk", d_sae=128, k=3, tokens=150_000, batch_size=256, lr=3e-3,
                buffer_tokens=8192, dead_window_tokens=20_000, checkpoint_every_tokens=50_000, log_every=20,
                progress=False, seed=0)
    return TrainConfig(**{**base, **overrides})


@pytest.mark.slow
def test_topk_recovers_planted_directions(tmp_path):
    data, directions = synthetic_activations(40_000, d_in=32, n_features=64, active=3)
    result = Trainer(config(tmp_path), TensorSource(data, rows_per_unit=1024), tmp_path).run()
    assert result.completed
    assert mean_max_cosine(directions, result.sae.W_dec.detach()) >= 0.9
    f = result.sae.encode(data[:2000])
    assert (f != 0).sum(1).float().mean() <= 3


@pytest.mark.slow
def test_standard_sae_learns_a_sparse_reconstruction(tmp_path):
    data, directions = synthetic_activations(40_000, d_in=32, n_features=64, active=3)
    cfg = config(tmp_path, architecture="standard", l1_coefficient=1.0, lr=3e-3)
    sae = Trainer(cfg, TensorSource(data, rows_per_unit=1024), tmp_path).run().sae
    x = data[:4000]
    fvu = (sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    l0 = (sae.encode(x) != 0).sum(1).float().mean()
    assert fvu < 0.2 and l0 < 32
    assert mean_max_cosine(directions, sae.W_dec.detach()) >= 0.8


@pytest.mark.slow
def test_interrupted_and_resumed_run_equals_uninterrupted_run(tmp_path):
    # Several buffer blocks per epoch and several epochs, so resume must restore the data position exactly.
    data, _ = synthetic_activations(20_000, d_in=16, n_features=32, active=3)
    make = lambda folder: Trainer(config(folder, tokens=60_000, d_sae=48, checkpoint_every_tokens=10_000,
                                         dead_window_tokens=5_000), TensorSource(data, rows_per_unit=1000), folder)
    full = make(tmp_path / "full").run()

    def stop_at_step_97(trainer):
        if trainer.step == 97:
            trainer.request_stop()

    stopped = make(tmp_path / "split").run(on_step=stop_at_step_97)
    assert not stopped.completed and stopped.steps == 97
    resumed = make(tmp_path / "split").run(resume=True)
    assert resumed.completed and resumed.steps == full.steps
    for name, tensor in full.sae.state_dict().items():
        assert torch.equal(tensor, resumed.sae.state_dict()[name]), name
    lines = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in lines]
    assert steps == sorted(set(steps)) and steps[-1] == full.steps


@pytest.mark.slow
def test_same_seed_same_sae_and_other_seed_differs(tmp_path):
    data, _ = synthetic_activations(5_000, d_in=16, n_features=32, active=3)
    run = lambda folder, seed: Trainer(config(folder, tokens=20_000, d_sae=48, seed=seed),
                                       TensorSource(data), folder).run().sae.W_dec
    assert torch.equal(run(tmp_path / "a", 0), run(tmp_path / "b", 0))
    assert not torch.equal(run(tmp_path / "a", 0), run(tmp_path / "c", 1))


def test_run_folder_has_metrics_and_checkpoint(tmp_path):
    data, _ = synthetic_activations(5_000, d_in=16, n_features=32, active=3)
    Trainer(config(tmp_path, tokens=20_000, d_sae=48), TensorSource(data), tmp_path).run()
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "tokens", "loss", "l0", "fvu", "dead_fraction", "lr", "tokens_per_second"} <= set(records[0])
    assert records[-1]["fvu"] < records[0]["fvu"]
    assert (tmp_path / "checkpoint.pt").exists()
    from saelab.training import plot_training_curves
    png = plot_training_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class CountingSource(TensorSource):
    """A TensorSource that counts the rows it hands out (each row costs a forward pass on a real model)."""

    def __init__(self, data, rows_per_unit):
        super().__init__(data, rows_per_unit)
        self.rows_given = 0

    def units(self, start):
        for unit in super().units(start):
            self.rows_given += len(unit)
            yield unit


def test_a_short_run_reads_only_what_it_trains_on_not_a_whole_buffer(tmp_path):
    data, _ = synthetic_activations(20_000, d_in=16, n_features=32, active=3)
    source = CountingSource(data, rows_per_unit=128)
    Trainer(config(tmp_path, tokens=1_000, batch_size=256, d_sae=48, buffer_tokens=16_384), source, tmp_path).run()
    assert 1_024 <= source.rows_given <= 1_024 + 128  # four batches, rounded up to whole units


def test_resume_refuses_a_changed_config(tmp_path):
    data, _ = synthetic_activations(5_000, d_in=16, n_features=32, active=3)
    Trainer(config(tmp_path, tokens=10_000, d_sae=48), TensorSource(data), tmp_path).run()
    with pytest.raises(ValueError, match="batch_size"):
        Trainer(config(tmp_path, tokens=10_000, d_sae=48, batch_size=128), TensorSource(data), tmp_path).run(resume=True)


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="batch_size must be positive"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="architecture must be one of"):
        TrainConfig(architecture="sparse-magic")


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["topk", "jumprelu"])
def test_a_compiled_step_trains_the_same_sae(tmp_path, architecture):
    """--compile (torch.compile of the training forward) changes the speed, not the result (float rounding)."""
    data, _ = synthetic_activations(4096, d_in=16, n_features=32, active=3)
    sparsity = {"k": 3} if architecture == "topk" else {"target_l0": 3}
    saes = []
    for compiled in (False, True):
        cfg = config(tmp_path / str(compiled), architecture=architecture, d_sae=64, tokens=256 * 12, compile=compiled,
                     **sparsity)
        saes.append(Trainer(cfg, TensorSource(data, rows_per_unit=1024), tmp_path / str(compiled)).run().sae)
    for name, value in saes[0].state_dict().items():
        torch.testing.assert_close(saes[1].state_dict()[name], value, rtol=1e-4, atol=1e-5)


@pytest.mark.subprocess
def test_the_gpu_benchmark_script_runs_on_cpu_at_small_sizes(tmp_path, tiny_model_dir):
    """benchmarks/gpu.sh --small (the GPU path's measurements: steps plain and under bf16 autocast, training end to
    end from a model) and the step benchmark's density mode keep working at tiny sizes on CPU."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "gpu.json"
    subprocess.run(["bash", str(root / "benchmarks" / "gpu.sh"), "--small", str(out), str(tiny_model_dir)],
                   check=True, capture_output=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    figures = json.loads(out.read_text())
    steps = [(p["architecture"], p["mode"]) for p in figures["points"] if not p.get("end_to_end")]
    assert steps == [("topk", "plain"), ("topk", "autocast"), ("jumprelu", "plain"), ("jumprelu", "autocast")]
    assert [p["architecture"] for p in figures["points"] if p.get("end_to_end")] == ["topk", "jumprelu"]
    assert all(p["tokens_per_s"] > 0 and p["peak_memory_mib"] > 0 for p in figures["points"])
    densities = tmp_path / "densities.json"
    subprocess.run([sys.executable, str(root / "benchmarks" / "step_speed.py"), "--small", "--densities", "0.05",
                    "--architectures", "jumprelu,gated", "--json", str(densities)], check=True, capture_output=True,
                   timeout=300)
    points = json.loads(densities.read_text())["points"]
    assert [p["architecture"] for p in points] == ["jumprelu", "gated"]
    assert all(p["dense_seconds"] > 0 and p["sparse_seconds"] > 0 for p in points)


@pytest.mark.parametrize("architecture", ["topk", "jumprelu", "gated"])
def test_bf16_autocast_trains_to_about_the_fp32_result(tmp_path, architecture):
    """--autocast: the step's products in bf16 (here on CPU), weights and losses in fp32; the run's losses stay
    finite and within bf16 rounding of the fp32 run's."""
    data = torch.randn(4096, 16) * torch.linspace(0.3, 2.0, 16)
    losses = []
    for autocast in (False, True):
        cfg = config(tmp_path / str(autocast), architecture=architecture, d_sae=64, tokens=256 * 8, autocast=autocast,
                     log_every=1, **({"k": 3} if architecture == "topk" else {}))
        result = Trainer(cfg, TensorSource(data, rows_per_unit=1024), tmp_path / str(autocast)).run()
        assert all(p.dtype == torch.float32 for p in result.sae.parameters())
        rows = [json.loads(line) for line in (tmp_path / str(autocast) / "metrics.jsonl").read_text().splitlines()]
        losses.append([row["fvu"] for row in rows if "fvu" in row])
    assert all(math.isfinite(v) for v in losses[1]) and len(losses[0]) == len(losses[1]) == 8
    for fp32, bf16 in zip(*losses):
        assert bf16 == pytest.approx(fp32, rel=0.05, abs=0.01)
