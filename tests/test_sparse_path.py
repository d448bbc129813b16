"""The TopK family trains through the sparse kernels (sae/sparse.py), never the dense encode/decode, and
the training step's bookkeeping does not need the host to look at device values."""

import pytest
import torch

from conftest import step_for
from saelab.sae import SAE, MatryoshkaSettings, SAEConfig, TrainStep, create_sae
from saelab.sae.sparse import count_fired


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
    assert {"TopKEncodeBackward", "BatchTopKEncodeBackward"} & nodes
    assert "auxk" in out.parts  # the dead latents given as indices reached the AuxK loss
    assert not any(name.startswith("MmBackward") for name in nodes)  # no dense [batch, d_sae] product in the graph


def test_fired_counts_equal_bincount_of_the_positive_codes():
    indices = torch.tensor([[0, 3, 5], [3, 5, 7], [1, 1, 0]])
    values = torch.tensor([[1.0, 0.0, 2.0], [0.5, 0.1, 0.0], [0.2, 0.0, 0.0]])
    expected = torch.bincount(indices[values > 0], minlength=8)
    assert torch.equal(count_fired(indices, values, 8), expected)


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
