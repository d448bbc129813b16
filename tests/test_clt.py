"""Cross-layer transcoders: each block's latents read that block's MLP input and write to the MLP outputs of that
block and every later one."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from conftest import assert_resumes_exactly
from saelab.cli import main
from saelab.data import TensorSource
from saelab.distributed import DataParallel
from saelab.sae import all_architectures, load_sae
from saelab.training import TrainConfig, Trainer
from saelab.training.lockstep import SharedBuffer
from saelab.training.trainer import training_buffer

D, BLOCKS, FEATURES, PER_BLOCK = 16, 3, 24, 48
READS = "+".join(f"blocks.{b}.ln2.hook_normalized" for b in range(BLOCKS))
WRITES = "+".join(f"blocks.{b}.hook_mlp_out" for b in range(BLOCKS))
SPARSITY = {"topk": {"k": 6}, "batchtopk": {"k": 6}, "matryoshka_batchtopk": {"k": 6}, "jumprelu": {"target_l0": 6},
            "standard": {"l1_coefficient": 1.0}, "gated": {"l1_coefficient": 1.0}, "abstopk": {"k": 6}}


def planted_cross_layer(n: int, active: int = 2, seed: int = 1000):
    """Each block has its own sparse features, read along their own directions; block l's features write to the
    output of every block l' >= l along planted directions ``writes[l][l']``."""
    g = torch.Generator().manual_seed(seed)

    def unit(rows: int) -> torch.Tensor:
        d = torch.randn(rows, D, generator=g)
        return d / d.norm(dim=1, keepdim=True)

    codes = []
    for _ in range(BLOCKS):
        chosen = torch.rand(n, FEATURES, generator=g).argsort(dim=1)[:, :active]
        codes.append(torch.zeros(n, FEATURES).scatter_(1, chosen, 0.5 + torch.rand(n, active, generator=g)))
    reads = [unit(FEATURES) for _ in range(BLOCKS)]
    writes = {(l, later): unit(FEATURES) for l in range(BLOCKS) for later in range(l, BLOCKS)}
    inputs = [codes[l] @ reads[l] for l in range(BLOCKS)]
    outputs = [sum(codes[l] @ writes[l, later] for l in range(later + 1)) for later in range(BLOCKS)]
    return inputs, outputs, writes


def clt_trainer(cfg: TrainConfig, inputs, outputs, run_dir) -> Trainer:
    data = torch.cat([*inputs, *outputs], 1)
    blocks = [slice(i * D, (i + 1) * D) for i in range(2 * BLOCKS)]
    source = TensorSource(data, rows_per_unit=1000)
    view = SharedBuffer(training_buffer(source, cfg, DataParallel(), torch.device("cpu"))).view(
        blocks[:BLOCKS], blocks[BLOCKS:])
    return Trainer(cfg, view, run_dir, buffer=view)


def config(tmp_path, **overrides) -> TrainConfig:
    base = dict(out=str(tmp_path), kind="clt", hook=READS, architecture="topk", k=6, d_sae=BLOCKS * PER_BLOCK,
                tokens=150_000, batch_size=256, lr=3e-3, buffer_tokens=8192, dead_window_tokens=5_000,
                checkpoint_every_tokens=5_000, log_every=10, progress=False, seed=0)
    return TrainConfig(**{**base, **overrides})


def unit_rows(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)


def test_a_clt_recovers_planted_cross_layer_writes(tmp_path):
    inputs, outputs, writes = planted_cross_layer(20_000)
    sae = clt_trainer(config(tmp_path), inputs, outputs, tmp_path).run().sae
    decoder = sae.W_dec.detach().view(BLOCKS, PER_BLOCK, BLOCKS, D)  # [source block, latent, target block, d]
    for (l, later), true in writes.items():
        cosines = true @ unit_rows(decoder[l, :, later]).T
        assert cosines.max(dim=1).values.mean() >= 0.9, (l, later)
    # a feature's writes to every later block come from one latent: the one that writes it to its own block
    own = (writes[0, 0] @ unit_rows(decoder[0, :, 0]).T).argmax(dim=1)
    last = (writes[0, 2] @ unit_rows(decoder[0, :, 2]).T).argmax(dim=1)
    assert (own == last).float().mean() >= 0.9
    assert torch.all(decoder[1, :, 0] == 0) and torch.all(decoder[2, :, :2] == 0)  # nothing writes backwards
    encoder = sae.W_enc.detach().view(BLOCKS, D, BLOCKS, PER_BLOCK)
    assert all(torch.all(encoder[i, :, j] == 0) for i in range(BLOCKS) for j in range(BLOCKS) if i != j)


@pytest.mark.parametrize("architecture", [a.name for a in all_architectures() if not a.module.tied_encoder])
def test_every_architecture_trains_resumes_and_round_trips_as_a_clt(architecture, tmp_path):
    inputs, outputs, _ = planted_cross_layer(6_000)
    make = lambda folder: clt_trainer(config(folder, architecture=architecture, tokens=12_800,
                                             **SPARSITY[architecture]), inputs, outputs, folder)
    full = assert_resumes_exactly(make, tmp_path)
    sae = full.sae
    sae.cfg.metadata.update(hook_name=READS, hook_names=READS.split("+"), hook_name_out=WRITES)
    sae.save(tmp_path / "folder")
    raw = json.loads((tmp_path / "folder" / "cfg.json").read_text())
    assert raw["architecture"].endswith("clt") and raw["n_hooks"] == BLOCKS and raw["d_out"] == BLOCKS * D
    with safe_open(tmp_path / "folder" / "sae_weights.safetensors", "pt") as weights:  # per-block tensors
        assert weights.get_slice("W_enc").get_shape() == [BLOCKS, D, PER_BLOCK]
        assert weights.get_slice("W_dec").get_shape() == [BLOCKS, PER_BLOCK, BLOCKS, D]
        assert weights.get_slice("b_dec").get_shape() == [BLOCKS, D]
    loaded = load_sae(tmp_path / "folder")
    x = torch.cat(inputs, 1)[:500]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sae(x))
        torch.testing.assert_close(loaded.encode(x), sae.encode(x))


def test_clt_configs():
    cfg = TrainConfig(kind="clt")
    assert cfg.hooks[:2] == ["blocks.0.ln2.hook_normalized", "blocks.1.ln2.hook_normalized"]
    assert cfg.hooks[6:] == [f"blocks.{b}.hook_mlp_out" for b in range(6)]
    with pytest.raises(ValueError, match="one output hook per hook read"):
        TrainConfig(kind="clt", hook=READS, hook_out="blocks.0.hook_mlp_out")


def test_train_and_eval_a_clt_through_the_cli(tiny_model_dir, text_file, tmp_path, capsys):
    run = tmp_path / "clt"
    assert main(["train", "--model", str(tiny_model_dir), "--dataset", str(text_file), "--kind", "clt", "--layers",
                 "0-2", "--architecture", "jumprelu", "--target-l0", "8", "--expansion", "2", "--tokens", "8192",
                 "--batch-size", "256", "--context-size", "64", "--eval-tokens", "1024", "--out", str(run),
                 "--no-progress"]) == 0
    sae = load_sae(run / "final")
    assert sae.cfg.cross_layer and sae.cfg.metadata["hook_names_out"] == WRITES.split("+")
    assert main(["eval", str(run), "--dataset", str(text_file), "--tokens", "2048", "--context-size", "64"]) == 0
    report = json.loads((run / f"eval-{text_file.stem}" / "metrics.json").read_text())
    assert list(report["by_hook"]) == WRITES.split("+")
    assert all(0 < row["fvu"] < 1.5 for row in report["by_hook"].values())
    # all MLP outputs replaced together lose about as much as the worst one replaced alone, or more (on this tiny
    # random model every replacement moves the loss by ~1e-4: errors at different blocks may cancel that much)
    alone = [row["ce_with_sae"] for row in report["by_hook"].values()]
    assert report["ce_with_sae"] >= max(alone) - 1e-3
    # L0 per block (the latents each block reads) adds up to the total L0
    assert sum(row["l0"] for row in report["by_hook"].values()) == pytest.approx(report["l0"], rel=1e-4)
    assert "L0 of its block's latents" in (run / f"eval-{text_file.stem}" / "summary.md").read_text()
    # Read as SAEs are; a latent of block 1 writes nothing to block 0's MLP output (its page shows 0 there).
    from test_crosscoders import check_reading_commands

    check_reading_commands(run, text_file, capsys)
    per_block = sae.cfg.d_sae // 3
    page = json.loads((run / "dashboard" / "data" / "features-0.js").read_text()[len("saelabFeatures("):-3])
    later = page["features"][str(per_block)]["decoder_norms"]
    assert later[0] == 0 and later[1] > 0
