"""Dead-latent remedies: ghost grads (standard SAEs), resampling toward badly reconstructed inputs (any
architecture), AuxK selection; each exact on resume."""

import json

import pytest
import torch

from conftest import step_for, synthetic_activations
from saelab.data import TensorSource
from saelab.sae import SAEConfig, create_sae
from saelab.training import TrainConfig, Trainer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    return synthetic_activations(20_000, d_in=16, n_features=32, active=3)[0]


def config(tmp_path, **overrides):
    # A strong L1 penalty on a standard SAE: without a remedy, ~40% of the latents die within 20k tokens.
    base = dict(out=str(tmp_path), architecture="standard", d_sae=64, tokens=60_000, batch_size=256, lr=3e-3,
                l1_coefficient=5.0, buffer_tokens=8192, dead_window_tokens=5_000, checkpoint_every_tokens=100_000,
                log_every=20, progress=False, seed=0, resample_every_tokens=10_000, resample_sample_tokens=4096)
    return TrainConfig(**{**base, **overrides})


def dead_fractions(folder) -> list[float]:
    return [json.loads(line)["dead_fraction"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_remedy_auto_and_validation():
    assert TrainConfig(architecture="topk").remedy == "auxk"
    assert TrainConfig(architecture="matryoshka").remedy == "auxk"
    assert TrainConfig(architecture="standard").remedy == "none"
    assert TrainConfig(architecture="jumprelu", dead_latent_remedy="resample").remedy == "resample"
    with pytest.raises(ValueError, match="ghost_grads is for the standard architecture"):
        TrainConfig(architecture="topk", dead_latent_remedy="ghost_grads")
    with pytest.raises(ValueError, match="auxk is for the topk, batchtopk, matryoshka_batchtopk, abstopk architectures"):
        TrainConfig(architecture="gated", dead_latent_remedy="auxk")
    with pytest.raises(ValueError, match="dead_latent_remedy must be one of"):
        TrainConfig(dead_latent_remedy="necromancy")
    with pytest.raises(ValueError, match="resample_every_tokens must be positive"):
        TrainConfig(resample_every_tokens=0)


def test_ghost_grads_reach_only_dead_latents():
    torch.manual_seed(0)
    sae = create_sae(SAEConfig(d_in=16, d_sae=48, architecture="standard"), training=True)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
    dead = torch.zeros(48, dtype=torch.bool)
    dead[[3, 7, 20, 41]] = True
    x = torch.randn(64, 16)
    out = sae.training_forward(x, step_for(sae, l1_coefficient=1.0, dead_mask=dead, remedy="ghost_grads"))
    ghost = out.parts["ghost_grads"]
    plain = sae.training_forward(x, step_for(sae, l1_coefficient=1.0, dead_mask=dead))
    assert "ghost_grads" not in plain.parts
    # As large as the reconstruction loss (per token, by construction), and added to the loss.
    assert torch.allclose(ghost, (out.x_hat - x).pow(2).sum(-1).mean(), rtol=1e-3)
    assert torch.allclose(out.loss, plain.loss + ghost)
    sae.zero_grad()
    ghost.backward()
    assert sae.b_dec.grad is None or not sae.b_dec.grad.any()
    assert not sae.W_enc.grad[:, ~dead].any() and sae.W_enc.grad[:, dead].abs().sum(0).gt(0).all()
    assert not sae.b_enc.grad[~dead].any() and sae.b_enc.grad[dead].ne(0).all()
    assert not sae.W_dec.grad[~dead].any() and sae.W_dec.grad[dead].abs().sum(1).gt(0).all()


def test_ghost_grads_keep_latents_alive(tmp_path, data):
    none = Trainer(config(tmp_path / "none", dead_latent_remedy="none"), TensorSource(data, 1000), tmp_path / "none")
    none.run()
    ghost = Trainer(config(tmp_path / "ghost", dead_latent_remedy="ghost_grads"), TensorSource(data, 1000),
                    tmp_path / "ghost")
    ghost.run()
    late = lambda values: sum(values[len(values) // 2:]) / (len(values) - len(values) // 2)
    without, with_ghost = late(dead_fractions(tmp_path / "none")), late(dead_fractions(tmp_path / "ghost"))
    assert without > 0.25                      # the setup does kill latents
    assert with_ghost < 0.5 * without          # ghost grads revive most of them
    records = [json.loads(line) for line in (tmp_path / "ghost" / "metrics.jsonl").read_text().splitlines()]
    assert any("ghost_grads" in r for r in records)


def test_resampling_sets_dead_latents_to_high_loss_inputs(tmp_path, data):
    trainer = Trainer(config(tmp_path, dead_latent_remedy="resample"), TensorSource(data, 1000), tmp_path)
    trainer._initialize()
    sae, optimizer = trainer.sae, trainer.optimizer
    x = data[:256] * trainer.scale
    sae.training_forward(x, step_for(sae, l1_coefficient=1.0)).loss.backward()
    optimizer.step()  # Adam now has moments for every latent
    dead = torch.tensor([2, 9, 30, 31, 50])
    trainer.tokens_since_fired[dead] = trainer.cfg.dead_window_tokens
    # 200 inputs the SAE reconstructs well (at b_dec) and 3 far away: those hold nearly all the squared loss.
    inputs = sae.b_dec.detach() + 1e-3 * torch.randn(200, 16)
    far = 50 * torch.randn(3, 16)
    inputs = torch.cat([inputs[:100], far, inputs[100:]])
    alive_norm = sae.W_enc.detach()[:, [i for i in range(64) if i not in dead.tolist()]].norm(dim=0).mean()
    before = {name: p.detach().clone() for name, p in sae.named_parameters()}

    assert trainer.resample_dead_latents(inputs) == 5
    far_directions = far / far.norm(dim=1, keepdim=True)
    for latent in dead.tolist():
        row = sae.W_dec.detach()[latent]
        assert torch.allclose(row.norm(), torch.tensor(1.0), atol=1e-5)
        assert (far_directions - row).norm(dim=1).min() < 1e-5   # one of the high-loss inputs, normalised
        assert torch.allclose(sae.W_enc.detach()[:, latent], row * 0.2 * alive_norm, atol=1e-5)
        assert sae.b_enc.detach()[latent] == 0
        state = optimizer.state[sae.W_dec]
        assert not state["exp_avg"][latent].any() and not state["exp_avg_sq"][latent].any()
        assert not optimizer.state[sae.W_enc]["exp_avg"][:, latent].any()
    untouched = [i for i in range(64) if i not in dead.tolist()]
    assert torch.equal(sae.W_dec.detach()[untouched], before["W_dec"][untouched])
    assert optimizer.state[sae.W_dec]["exp_avg"][untouched].abs().sum() > 0
    assert trainer.tokens_since_fired[dead].eq(0).all()       # a fresh window: no longer counted dead
    assert trainer.resample_dead_latents(inputs) == 0


def test_resampling_revives_latents_in_training(tmp_path, data):
    trainer = Trainer(config(tmp_path, dead_latent_remedy="resample"), TensorSource(data, 1000), tmp_path)
    trainer.run()
    Trainer(config(tmp_path / "none", dead_latent_remedy="none"), TensorSource(data, 1000), tmp_path / "none").run()
    assert trainer.resampled > 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["resampled_latents"] == trainer.resampled
    late = lambda values: sum(values[len(values) // 2:]) / (len(values) - len(values) // 2)
    assert late(dead_fractions(tmp_path)) < late(dead_fractions(tmp_path / "none"))


@pytest.mark.parametrize("architecture,d_sae", [("standard", 64), ("batchtopk", 256)])
def test_resumed_run_with_resampling_equals_uninterrupted_run(tmp_path, data, architecture, d_sae):
    overrides = dict(dead_latent_remedy="resample", checkpoint_every_tokens=10_000, architecture=architecture,
                     d_sae=d_sae, k=2)
    make = lambda folder: Trainer(config(folder, **overrides), TensorSource(data, rows_per_unit=1000), folder)
    full = make(tmp_path / "full")
    full_result = full.run()
    assert full.resampled > 0

    def stop(trainer):
        if trainer.step == 61:   # between resamplings (at steps 40, 79, ...)
            trainer.request_stop()

    split = make(tmp_path / "split")
    assert not split.run(on_step=stop).completed
    resumed = make(tmp_path / "split")
    result = resumed.run(resume=True)
    assert result.completed and resumed.resampled == full.resampled
    for name, tensor in full_result.sae.state_dict().items():
        assert torch.equal(tensor, result.sae.state_dict()[name]), name
