"""The TopK family trains through the sparse kernels (sae/sparse.py), never the dense encode/decode, and
the training step's bookkeeping does not need the host to look at device values."""

import pytest
import torch

from conftest import step_for
from saelab.sae import SAE, MatryoshkaSettings, SAEConfig, TrainStep, create_sae
from saelab.sae.sparse import Support, count_fired


def graph_nodes(tensor: torch.Tensor) -> set[str]:
    seen, stack, names = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "matryoshka_batchtopk"])
def test_topk_family_trains_through_the_sparse_kernels(architecture, monkeypatch):
    cfg = SAEConfig(d_in=16, d_sae=64, architecture=architecture, k=4)
    widths = MatryoshkaSettings(matryoshka_widths="16,32") if architecture == "matryoshka_batchtopk" else None
    sae = create_sae(cfg, training=True, settings=widths)
    sae.initialize(torch.randn(256, 16), "mean", torch.Generator().manual_seed(0))

    def dense(*_args, **_kwargs):
        raise AssertionError("the dense path ran during training")

    monkeypatch.setattr(SAE, "decode", dense)
    monkeypatch.setattr(type(sae), "encode", dense)
    dead = torch.arange(0, 64, 3)
    out = sae.training_forward(torch.randn(32, 16), step_for(sae, remedy="auxk", dead_latents=dead, aux_k=8, aux_coefficient=0.1))
    nodes = graph_nodes(out.loss)
    assert "SparseDecodeBackward" in nodes
    assert {"TopKEncodeBackward", "PreActivationsBackward"} & nodes
    assert "auxk" in out.parts  # the dead latents given as indices reached the AuxK loss
    assert not any(name.startswith("MmBackward") for name in nodes)  # no dense [batch, d_sae] product in the graph


def test_fired_counts_equal_bincount_of_the_positive_codes():
    indices = torch.tensor([[0, 3, 5], [3, 5, 7], [1, 1, 0]])
    values = torch.tensor([[1.0, 0.0, 2.0], [0.5, 0.1, 0.0], [0.2, 0.0, 0.0]])
    expected = torch.bincount(indices[values > 0], minlength=8)
    assert torch.equal(count_fired(indices, values, 8), expected)


def test_a_support_of_flat_positions_lists_the_entries_as_one_of_their_mask_does():
    mask = torch.rand(37, 50, generator=torch.Generator().manual_seed(0)) < 0.1
    mask[5] = False  # a row with no entries
    flat = mask.view(-1).nonzero().view(-1)
    from_flat = Support.of_flat(flat[torch.randperm(len(flat))], 37, 50)
    from_mask = Support.of_mask(mask)
    for name in ("rows", "latents", "row_starts"):
        assert torch.equal(getattr(from_flat, name), getattr(from_mask, name)), name


def test_dead_latents_given_as_indices_or_a_mask_mean_the_same():
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[2, 7]] = True
    assert torch.equal(TrainStep(dead_mask=mask).dead(), torch.tensor([2, 7]))
    assert torch.equal(TrainStep(dead_latents=torch.tensor([2, 7])).dead(), torch.tensor([2, 7]))
    assert TrainStep(dead_latents=torch.zeros(0, dtype=torch.long)).dead() is None
    assert TrainStep(dead_mask=torch.zeros(10, dtype=torch.bool)).dead() is None
    assert TrainStep().dead() is None


@pytest.mark.parametrize("batch, d_sae, k", [(512, 2048, 8), (64, 256, 4), (8, 16, 2)])
def test_the_batch_top_search_through_row_candidates_is_the_whole_search(batch, d_sae, k):
    from saelab.sae.batchtopk import batch_top

    g = torch.Generator().manual_seed(batch)
    acts = torch.randn(batch, d_sae, generator=g).relu_()
    acts[1] += 5.0 * (torch.rand(d_sae, generator=g) < 0.5)  # one token with over 4k of the budget: the fallback
    for data in (acts, torch.randn(batch, d_sae, generator=g).relu_()):
        values, flat = batch_top(data, k * batch, k)
        expected = data.view(-1).topk(k * batch).indices
        assert torch.equal(flat.sort().values, expected.sort().values)
        assert torch.equal(data.view(-1)[flat], values)


def thresholded_sae(architecture: str, kind: str):
    """A trained-looking thresholded SAE: few codes fire (negative encoder biases), and for JumpReLU some
    pre-activations lie within the estimators' kernel below their thresholds."""
    cfg = SAEConfig(d_in=16, d_sae=96, architecture=architecture, kind=kind, d_out=12 if kind != "sae" else None)
    sae = create_sae(cfg, training=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for name in ("b_enc", "b_gate"):
            if name in sae._parameters:
                getattr(sae, name).sub_(1.0)
        if architecture == "jumprelu":
            sae.settings.jumprelu_bandwidth = 0.5
    return sae


def step_results(sae, x, target, sparse_below):
    sae.sparse_below = sparse_below
    sae.zero_grad()
    out = sae.training_forward(x, step_for(sae), target)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in sae.named_parameters()}


@pytest.mark.parametrize("kind", ["sae", "transcoder", "skip_transcoder"])
@pytest.mark.parametrize("architecture", ["jumprelu", "standard", "gated"])
def test_thresholded_architectures_sparse_path_equals_the_dense_one(architecture, kind):
    sae = thresholded_sae(architecture, kind)
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(2))
    target = None if kind == "sae" else torch.randn(40, 12, generator=torch.Generator().manual_seed(3))
    dense, dense_grads = step_results(sae, x, target, sparse_below=0.0)
    sparse, sparse_grads = step_results(sae, x, target, sparse_below=1.01)
    assert 0 < dense.fired.sum() < 0.3 * 40 * 96  # codes are sparse, not empty
    assert torch.equal(dense.fired, sparse.fired)
    assert torch.allclose(dense.x_hat, sparse.x_hat, atol=1e-5)
    assert torch.allclose(dense.loss, sparse.loss, rtol=1e-5)
    for name, value in dense.parts.items():
        assert torch.allclose(value, sparse.parts[name], rtol=1e-5, atol=1e-6), name
    for name, grad in dense_grads.items():
        assert grad.abs().sum() > 0, name
        assert torch.allclose(grad, sparse_grads[name], rtol=1e-4, atol=1e-5), name
    nodes = graph_nodes(sae.training_forward(x, step_for(sae), target).loss)
    assert "SparseDecodeBackward" in nodes and "PreActivationsBackward" in nodes
    products = sum(name.startswith("MmBackward") for name in nodes)
    assert products == (kind == "skip_transcoder")  # the skip term's x @ W_skip.T; no [batch, d_sae] product


def test_a_thresholded_step_takes_the_sparse_path_only_when_few_codes_get_gradients():
    sae = thresholded_sae("standard", "sae")
    with torch.no_grad():
        sae.b_enc.sub_(2.0)  # about 1% fire
    x = torch.randn(40, 16)
    assert "SparseDecodeBackward" in graph_nodes(sae.training_forward(x, step_for(sae)).loss)
    with torch.no_grad():
        sae.b_enc.add_(4.0)  # now most codes fire
    nodes = graph_nodes(sae.training_forward(x, step_for(sae)).loss)
    assert "SparseDecodeBackward" not in nodes and "PreActivationsBackward" in nodes


def test_a_fitted_start_scales_the_encoders_learning_rate_with_its_codes(tmp_path):
    """Adam moves a parameter by about lr per step whatever its size: when the fitted start shrinks the codes, the
    encoder's rate shrinks with them (and a gated SAE's gate keeps the full rate)."""
    from saelab.data import TensorSource
    from saelab.training import TrainConfig, Trainer

    data = torch.randn(4096, 16) * torch.linspace(0.2, 3.0, 16)
    for architecture, scaled in (("jumprelu", True), ("gated", False)):
        cfg = TrainConfig(architecture=architecture, expansion=16, batch_size=256, tokens=2048, out=str(tmp_path),
                          progress=False, eval_tokens=0, checkpoint_every_tokens=10**9)
        trainer = Trainer(cfg, TensorSource(data), tmp_path / architecture)
        trainer.open()
        assert trainer.sae.code_scale < 0.9  # 256 random latents overshoot: the codes were scaled down
        groups = {group["in_codes"]: group for group in trainer.optimizer.param_groups}
        assert (True in groups) == scaled
        if scaled:
            assert {id(p) for p in groups[True]["params"]} == {id(trainer.sae.W_enc), id(trainer.sae.b_enc)}
            trainer.advance()
            assert groups[True]["lr"] == pytest.approx(groups[False]["lr"] * trainer.sae.code_scale)
        trainer.close()
