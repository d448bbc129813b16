"""The SAE interface: encode formulas, sparse training path, constraints, folding the input scale."""

import pytest
import torch

from conftest import step_for
from saelab.sae import SAEConfig, create_sae
from saelab.sae.base import geometric_median


def random_sae(architecture, d_in=16, d_sae=48, k=5, seed=0):
    torch.manual_seed(seed)
    sae = create_sae(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=architecture,
                               k=k if architecture == "topk" else None))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return sae


def test_topk_encode_is_relu_of_the_k_largest_preactivations():
    sae = random_sae("topk")
    x = torch.randn(64, 16)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    f = sae.encode(x)
    for row_pre, row_f in zip(pre, f):
        top = row_pre.topk(5).indices
        expected = torch.zeros_like(row_pre)
        expected[top] = row_pre[top].clamp_min(0)
        assert torch.allclose(row_f, expected)
    assert ((f != 0).sum(1) <= 5).all()


def test_standard_encode_is_relu_and_decode_is_affine():
    sae = random_sae("standard")
    x = torch.randn(10, 16)
    f = sae.encode(x)
    assert torch.allclose(f, torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc))
    assert torch.allclose(sae.decode(f), f @ sae.W_dec + sae.b_dec)


@pytest.mark.parametrize("architecture", ["topk", "standard"])
def test_training_forward_reconstructs_like_inference(architecture):
    sae = random_sae(architecture)
    x = torch.randn(32, 16)
    out = sae.training_forward(x, step_for(sae, l1_coefficient=1.0))
    assert torch.allclose(out.x_hat, sae(x), atol=1e-5)
    assert torch.equal(out.fired, (sae.encode(x) != 0).sum(0))
    out.loss.backward()
    assert sae.W_enc.grad is not None and sae.W_dec.grad.abs().sum() > 0


def test_auxk_loss_only_with_dead_latents_and_reaches_them():
    sae = random_sae("topk")
    x = torch.randn(32, 16)
    no_dead = sae.training_forward(x, step_for(sae, remedy="auxk", dead_mask=torch.zeros(48, dtype=torch.bool),
                                               aux_k=8, aux_coefficient=1 / 32))
    assert "auxk" not in no_dead.parts
    dead = torch.zeros(48, dtype=torch.bool)
    dead[40:] = True
    out = sae.training_forward(x, step_for(sae, remedy="auxk", dead_mask=dead, aux_k=4, aux_coefficient=1 / 32))
    assert out.parts["auxk"] > 0
    sae.zero_grad()
    out.parts["auxk"].backward()
    assert sae.W_dec.grad[40:].abs().sum() > 0          # dead rows learn from the residual
    assert sae.W_dec.grad[:40].abs().sum() == 0         # live rows get nothing from AuxK


def test_topk_constraints_keep_decoder_rows_unit_norm():
    sae = random_sae("topk")
    sae.constrain_weights()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(48), atol=1e-6)
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.constrain_gradients()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-5


@pytest.mark.parametrize("architecture", ["topk", "standard"])
def test_folding_the_input_scale_gives_the_same_latents_on_raw_inputs(architecture):
    sae = random_sae(architecture)
    x = torch.randn(20, 16) * 7
    scale = 0.37
    latents_scaled, recon_scaled = sae.encode(x * scale), sae(x * scale)
    sae.fold_input_scale(scale)
    assert torch.allclose(sae.encode(x), latents_scaled, atol=1e-5)
    assert torch.allclose(sae(x), recon_scaled / scale, atol=1e-4)


def test_wrong_input_width_is_a_clear_error():
    sae = random_sae("topk")
    with pytest.raises(ValueError, match="d_in=16"):
        sae.encode(torch.randn(3, 17))


def test_geometric_median_ignores_outliers():
    points = torch.randn(500, 4) * 0.1
    points[:20] += 1000.0
    assert geometric_median(points).norm() < 0.5
    assert points.mean(0).norm() > 10


def test_unknown_architecture_names_the_known_ones():
    with pytest.raises(ValueError, match="topk"):
        create_sae(SAEConfig(d_in=4, d_sae=8, architecture="nope"))


def dense_topk_reference_loss(sae, x, dead, aux_k, aux_coefficient):
    """TopK training loss written the plain way, with dense codes and autograd everywhere."""
    pre = sae.encode_pre(x)
    values, indices = pre.topk(sae.cfg.k, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, indices, values.relu())
    x_hat = f @ sae.W_dec + sae.b_dec
    variance = lambda t: (t - t.mean(0)).pow(2).sum()
    loss = (x_hat - x).pow(2).sum() / variance(x)
    residual = (x - x_hat).detach()
    dead_pre = pre.masked_fill(~dead, float("-inf"))
    aux_values, aux_indices = dead_pre.topk(aux_k, dim=-1)
    aux_f = torch.zeros_like(pre).scatter(-1, aux_indices, aux_values.relu())
    return loss + aux_coefficient * (aux_f @ sae.W_dec - residual).pow(2).sum() / variance(residual)


def test_sparse_topk_gradients_equal_the_dense_computation():
    sae = random_sae("topk", d_in=24, d_sae=96, k=6)
    x = torch.randn(50, 24)
    dead = torch.zeros(96, dtype=torch.bool)
    dead[::3] = True
    info = step_for(sae, remedy="auxk", dead_mask=dead, aux_k=5, aux_coefficient=0.5)
    sparse_loss = sae.training_forward(x, info).loss
    sparse_grads = torch.autograd.grad(sparse_loss, list(sae.parameters()))
    dense_loss = dense_topk_reference_loss(sae, x, dead, 5, 0.5)
    dense_grads = torch.autograd.grad(dense_loss, list(sae.parameters()))
    assert torch.allclose(sparse_loss, dense_loss, atol=1e-6)
    for (name, _), sparse, dense in zip(sae.named_parameters(), sparse_grads, dense_grads):
        assert torch.allclose(sparse, dense, atol=1e-5, rtol=1e-4), name
