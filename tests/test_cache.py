"""The activation cache on a tiny local model: what it stores, resumable writing, and training and sweeping
from it without the model."""

import json

import numpy as np
import pytest
import torch

from saelab import SAE
from saelab.cli import main
from saelab.data import LMActivationSource, Packing
from saelab.data import cache as cache_module
from saelab.data.cache import ActivationCache, CacheConfig, CachedActivationSource, write_cache
from saelab.models import load_model, resolve_hook
from saelab.models.hooks import capture
from saelab.training import TrainConfig, Trainer

HOOKS = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
SHARED = ["--lr", "3e-3", "--batch-size", "256", "--buffer-tokens", "2048", "--expansion", "4",
         "--no-progress", "--log-every", "4", "--dead-window-tokens", "1024"]
TRAIN = ["--k", "4", *SHARED]


def cache_config(model_dir, text_file, out, **overrides) -> CacheConfig:
    base = dict(model=str(model_dir), dataset=str(text_file), hooks=",".join(HOOKS), tokens=6144, context_size=32,
                lm_batch_size=8, shard_tokens=1024, out=str(out), progress=False)
    return CacheConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def cached(tiny_model_dir, text_file, tmp_path_factory):
    """A two-hook cache of 6144 tokens: 192 contexts, 24 forward batches, 6 shards of 4 batches."""
    return write_cache(cache_config(tiny_model_dir, text_file, tmp_path_factory.mktemp("cache") / "acts"))


@pytest.fixture
def count_forwards(monkeypatch):
    """Model forwards run while caching: the cache's own, and the width probe (saelab.models.hook_widths)."""
    import saelab.models.hooks

    counts = {"forwards": 0}
    original = cache_module.capture

    def counting(*args, **kwargs):
        counts["forwards"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(cache_module, "capture", counting)
    monkeypatch.setattr(saelab.models.hooks, "capture", counting)
    return counts


def no_model(monkeypatch):
    """Make loading a model an error in training and sweeping: a cache must be enough."""
    import saelab.data.sources

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(saelab.data.sources, "load_model", refuse)


def files(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cache_holds_what_one_forward_captures_at_every_hook(tiny_model_dir, text_file, tmp_path, count_forwards):
    out = write_cache(cache_config(tiny_model_dir, text_file, tmp_path / "acts", tokens=2048))
    assert count_forwards["forwards"] == 1 + 2048 // (32 * 8)  # a width probe, then one forward per batch
    cache = ActivationCache(out)
    meta = cache.metadata
    assert meta["hooks"]["blocks.1.hook_resid_post"] == {"module_path": "model.layers.1", "reads_input": False,
                                                          "d_in": 32}
    assert (meta["contexts"], meta["tokens"], meta["context_size"], meta["dtype"]) == (64, 2048, 32, "float32")
    assert meta["tokenizer"] == str(tiny_model_dir) and meta["complete"] and len(meta["shards"]) == 2

    model, tokenizer = load_model(str(tiny_model_dir), "cpu")
    hooks = [resolve_hook(model, name) for name in HOOKS]
    live = LMActivationSource(model, tokenizer, hooks[1], str(text_file), Packing(32, True), batch_contexts=8)
    tokens = torch.cat([torch.from_numpy(np.load(out / "tokens" / f"shard_0000{i}.npy")) for i in range(2)])
    assert torch.equal(tokens.long(), torch.cat(list(live.token_batches()))[:64])  # packed as training packs
    for name in HOOKS:
        for index, (act, keep) in enumerate(cache.activations(name)):
            batch = tokens[index * 8:(index + 1) * 8].long()
            assert torch.equal(keep, live.keep_mask(batch)) and not keep[:, 0].any()  # BOS left out
            assert torch.equal(act[keep], capture(model, batch, hooks)[name][keep])
            assert (act[~keep] == 0).all()


def test_half_precision_storage_is_close_and_half_the_size(tiny_model_dir, text_file, tmp_path, cached):
    for dtype in ("float16", "bfloat16"):
        out = write_cache(cache_config(tiny_model_dir, text_file, tmp_path / dtype, tokens=1024, dtype=dtype))
        full = ActivationCache(cached).source(HOOKS[0], stop=32)
        half = ActivationCache(out).source(HOOKS[0])
        for a, b in zip(full.units(0), half.units(0), strict=True):
            assert b.dtype == torch.float32 and torch.allclose(a, b, rtol=1e-2, atol=1e-2) and not torch.equal(a, b)
        assert (out / "hooks" / HOOKS[0] / "shard_00000.npy").stat().st_size < 0.6 * (
            cached / "hooks" / HOOKS[0] / "shard_00000.npy").stat().st_size


def test_interrupted_write_resumes_to_identical_files(tiny_model_dir, text_file, tmp_path, cached, monkeypatch):
    cfg = cache_config(tiny_model_dir, text_file, tmp_path / "acts")
    original = cache_module.capture
    calls = {"n": 0}

    def killed_in_shard_3(*args, **kwargs):  # the probe, 4 forwards per shard: the 2nd forward of shard 3
        calls["n"] += 1
        if calls["n"] == 1 + 4 * 3 + 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(cache_module, "capture", killed_in_shard_3)
    with pytest.raises(KeyboardInterrupt):
        write_cache(cfg)
    meta = json.loads((tmp_path / "acts" / "metadata.json").read_text())
    assert len(meta["shards"]) == 3 and not meta["complete"]
    with pytest.raises(ValueError, match="incomplete"):
        ActivationCache(tmp_path / "acts")

    calls["n"] = -1000  # no more interruptions; count what the rerun does
    write_cache(cfg)
    assert calls["n"] == -1000 + 4 * 3  # the 3 missing shards only (the hook widths are in the metadata)
    assert files(tmp_path / "acts") == files(cached)


def test_another_config_is_refused_and_overwrite_replaces(tiny_model_dir, text_file, tmp_path, count_forwards):
    cfg = cache_config(tiny_model_dir, text_file, tmp_path / "acts", tokens=1024)
    write_cache(cfg)
    count_forwards["forwards"] = 0
    write_cache(cfg)  # complete with the same config: nothing to do
    assert count_forwards["forwards"] == 0
    with pytest.raises(ValueError, match=r"context_size 32 -> 64.*--overwrite"):
        write_cache(cache_config(tiny_model_dir, text_file, tmp_path / "acts", tokens=1024, context_size=64))
    rc = main(["cache", "--model", str(tiny_model_dir), "--dataset", str(text_file), "--hooks", HOOKS[0],
               "--out", str(tmp_path / "acts"), "--context-size", "64", "--tokens", "1024", "--no-progress",
               "--overwrite"])
    assert rc == 0
    meta = ActivationCache(tmp_path / "acts").metadata
    assert meta["context_size"] == 64 and list(meta["hooks"]) == [HOOKS[0]]
    assert not (tmp_path / "acts" / "hooks" / HOOKS[1]).exists()


def test_cached_source_units_resume_anywhere(cached):
    source = ActivationCache(cached).source(HOOKS[1], stop=150)
    units = list(source.units(0))
    assert len(units) == 19 and sum(len(u) for u in units) == source.rows()  # 18 batches of 8 contexts + 6
    for start in (1, 4, 5, 18):  # inside a shard, at shard boundaries, the last
        assert all(torch.equal(a, b) for a, b in zip(source.units(start), units[start:], strict=True))


@pytest.mark.slow
def test_training_on_the_cache_equals_training_on_the_model(tiny_model_dir, text_file, cached, tmp_path):
    # Several buffer blocks per epoch and several epochs over the 192 cached contexts.
    cfg = lambda out: TrainConfig(out=str(out), d_sae=64, k=4, tokens=24_576, batch_size=256, lr=3e-3,
                                  buffer_tokens=2048, dead_window_tokens=2048, progress=False, log_every=8)
    model, tokenizer = load_model(str(tiny_model_dir), "cpu")
    live = LMActivationSource(model, tokenizer, resolve_hook(model, HOOKS[1]), str(text_file), Packing(32, True),
                              batch_contexts=8, max_contexts=192)
    from_model = Trainer(cfg(tmp_path / "live"), live, tmp_path / "live").run().sae.state_dict()
    source = CachedActivationSource(ActivationCache(cached), HOOKS[1])
    from_cache = Trainer(cfg(tmp_path / "cached"), source, tmp_path / "cached").run().sae.state_dict()
    for name, tensor in from_model.items():
        assert torch.equal(tensor, from_cache[name]), name


@pytest.mark.slow
def test_train_cli_on_the_cache_without_the_model(tiny_model_dir, text_file, cached, tmp_path, monkeypatch, capsys):
    # Same SAE as `saelab train` on the model (no held-out text either way: the rows line up).
    args = [*TRAIN, "--tokens", "4096", "--eval-tokens", "0"]
    live = ["train", "--model", str(tiny_model_dir), "--dataset", str(text_file), "--context-size", "32",
            "--lm-batch-size", "8", "--hook", HOOKS[0], "--out", str(tmp_path / "live"), *args]
    assert main(live) == 0
    no_model(monkeypatch)
    assert main(["train", "--activations", str(cached), "--hook", HOOKS[0], "--out", str(tmp_path / "c"), *args]) == 0
    a, b = SAE.load(tmp_path / "live" / "final"), SAE.load(tmp_path / "c" / "final")
    assert all(torch.equal(t, b.state_dict()[name]) for name, t in a.state_dict().items())
    assert a.cfg.metadata == b.cfg.metadata  # model, hook, context size, dataset ... from the cache
    assert b.cfg.metadata["model_name"] == str(tiny_model_dir) and b.cfg.metadata["context_size"] == 32

    # With held-out evaluation: the cache's last 512 tokens, reconstruction metrics without the model.
    out = tmp_path / "held"
    assert main(["train", "--activations", str(cached), "--hook", HOOKS[1], "--out", str(out), *TRAIN,
                 "--tokens", "4096", "--eval-tokens", "512"]) == 0
    metrics = json.loads((out / "eval.json").read_text())
    rows_held_out = ActivationCache(cached).row_count() - ActivationCache(cached).row_count(192 - 16)
    assert metrics["tokens"] == rows_held_out and 0 < metrics["l0"] <= 4 and metrics["explained_variance"] > 0.5
    assert "ce_loss_score" not in metrics and "held out" in metrics["eval_dataset"]
    assert json.loads((out / "final" / "runner_cfg.json").read_text())["context_size"] == 32
    assert SAE.load(out / "final").cfg.metadata["hook_name"] == HOOKS[1]


def test_eval_dataset_loads_the_model_for_ce(tiny_model_dir, text_file, cached, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--activations", str(cached), "--hook", HOOKS[1], "--out", str(out), *TRAIN,
                 "--tokens", "2048", "--eval-tokens", "256", "--eval-dataset", str(text_file)]) == 0
    metrics = json.loads((out / "eval.json").read_text())
    assert metrics["eval_dataset"] == str(text_file) and metrics["ce_loss_score"] == metrics["ce_loss_score"]


@pytest.mark.slow
def test_sweep_cli_on_the_cache_without_the_model(tiny_model_dir, text_file, cached, tmp_path, monkeypatch):
    one_hook = write_cache(cache_config(tiny_model_dir, text_file, tmp_path / "acts", hooks=HOOKS[1], tokens=4096))
    no_model(monkeypatch)
    out = tmp_path / "sweep"
    # No --hook: the cache's only hook is used.
    assert main(["sweep", "--activations", str(one_hook), "--architectures", "topk", "--k", "2,4", "--out", str(out),
                 *SHARED, "--tokens", "2048", "--eval-tokens", "512"]) == 0
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["shared"]["hook"] == HOOKS[1] and summary["activation_rows"] == ActivationCache(one_hook).row_count(112)
    l0s = [row["l0"] for row in summary["rows"]]
    assert 0 < l0s[0] <= 2 < l0s[1] <= 4 and all(row["ce_loss_score"] is None for row in summary["rows"])
    assert SAE.load(out / "topk-k2" / "final").cfg.metadata["model_name"] == str(tiny_model_dir)


def test_bad_caches_and_hooks_are_clear_errors(tiny_model_dir, text_file, cached, tmp_path, capsys):
    def error(args):
        rc = main(args)
        return rc, capsys.readouterr().err

    train = lambda *extra: ["train", "--out", str(tmp_path / "r"), *TRAIN, *extra]
    rc, err = error(train("--activations", str(tmp_path / "missing")))
    assert rc == 2 and "does not exist" in err and "saelab cache" in err
    (tmp_path / "plain").mkdir()
    rc, err = error(train("--activations", str(tmp_path / "plain")))
    assert rc == 2 and "no metadata.json" in err
    rc, err = error(train("--activations", str(cached)))  # two hooks, none chosen
    assert rc == 2 and "holds 2 hooks" in err and HOOKS[0] in err and HOOKS[1] in err and "--hook" in err
    rc, err = error(train("--activations", str(cached), "--hook", "blocks.2.hook_resid_post"))
    assert rc == 2 and "no hook 'blocks.2.hook_resid_post'" in err and HOOKS[0] in err
    rc, err = error(train("--activations", str(cached), "--hook", HOOKS[0], "--context-size", "64"))
    assert rc == 2 and "context_size 64" in err and "drop those options" in err
    rc, err = error(train("--activations", str(cached), "--hook", HOOKS[0], "--eval-tokens", "100000"))
    assert rc == 2 and "none to train on" in err
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    rc, err = error(["cache", "--model", str(tiny_model_dir), "--dataset", str(text_file), "--out",
                     str(tmp_path / "notes"), "--no-progress"])
    assert rc == 2 and "not an activation cache" in err and (tmp_path / "notes" / "a.txt").exists()
    rc, err = error(["cache", "--model", str(tiny_model_dir), "--dataset", str(text_file), "--hooks",
                     "blocks.7.hook_resid_post", "--out", str(tmp_path / "x"), "--no-progress"])
    assert rc == 2 and "unknown hook point 'blocks.7.hook_resid_post'" in err
