"""Nothing saelab reads may run code: a checkpoint carrying a pickled payload is refused with a clear error,
and the payload never runs."""

from __future__ import annotations

import pathlib

import torch

from saelab.cli import main


class Payload:
    """Unpickling this creates a file: the proof that code from the file ran."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_a_checkpoint_with_a_pickled_payload_is_refused_and_never_runs(tmp_path, capsys):
    run, marker = tmp_path / "run", tmp_path / "payload-ran"
    run.mkdir()
    torch.save({"config": {"out": str(run)}, "extra": Payload(marker)}, run / "checkpoint.pt")
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt" in err and "could run code" in err and "--overwrite" in err
    assert len(err.strip().splitlines()) == 1  # one line, no traceback
    assert not marker.exists()


def test_a_cache_shard_with_a_pickled_payload_is_refused_and_never_runs(tiny_model_dir, text_file, tmp_path, capsys):
    import numpy as np

    from saelab.data.cache import CacheConfig, write_cache

    acts, marker = tmp_path / "acts", tmp_path / "payload-ran"
    write_cache(CacheConfig(model=str(tiny_model_dir), dataset=str(text_file), hooks="blocks.1.hook_resid_post",
                            tokens=2048, context_size=32, lm_batch_size=8, shard_tokens=1024, out=str(acts),
                            progress=False))
    shard = acts / "hooks" / "blocks.1.hook_resid_post" / "shard_00000.npy"
    np.save(shard, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    rc = main(["train", "--activations", str(acts), "--tokens", "512", "--batch-size", "128", "--buffer-tokens",
               "512", "--eval-tokens", "0", "--expansion", "2", "--k", "4", "--no-progress",
               "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "shard_00000.npy" in err and "not an activation shard" in err
    assert not marker.exists()
