"""Every file saelab reads, damaged or planted, is a one-line error that names the file, the fault and the
fix; nothing in a file can run code (a pickled payload is refused and never runs)."""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest
import torch

from saelab.cli import main

TRAIN = ["--tokens", "2048", "--k", "4", "--batch-size", "256", "--context-size", "32", "--lm-batch-size", "8",
         "--buffer-tokens", "2048", "--eval-tokens", "256", "--hook", "blocks.1.hook_resid_post", "--expansion", "2",
         "--no-progress", "--log-every", "2", "--checkpoint-every-tokens", "1024"]

FROM_CACHE = ["--tokens", "512", "--batch-size", "128", "--buffer-tokens", "512", "--eval-tokens", "0", "--k", "4",
              "--expansion", "2", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, text_file, tmp_path_factory):
    """A finished run of two SAEs (hooks 0 and 1) on the tiny model, and a sweep of two grid points."""
    root = tmp_path_factory.mktemp("bad_files")
    data = ["--model", str(tiny_model_dir), "--dataset", str(text_file)]
    assert main(["train", *data, *TRAIN, "--out", str(root / "run")]) == 0
    assert main(["train", *data, *TRAIN, "--hook", "blocks.0.hook_resid_post,blocks.1.hook_resid_post",
                 "--out", str(root / "multi")]) == 0
    assert main(["sweep", *data, *TRAIN, "--architectures", "topk", "--k", "2,4", "--out", str(root / "sweep")]) == 0
    assert main(["cache", *data, "--hooks", "blocks.1.hook_resid_post", "--tokens", "2048", "--context-size", "32",
                 "--lm-batch-size", "8", "--shard-tokens", "1024", "--no-progress", "--out", str(root / "acts")]) == 0
    return root


def damaged(trained, tmp_path, name: str, file: str, how: str) -> pathlib.Path:
    """A copy of ``trained/name`` whose ``file`` is cut short (``truncate``), emptied or replaced by junk."""
    copy = tmp_path / name
    shutil.copytree(trained / name, copy)
    path = copy / file
    data = path.read_bytes()
    path.write_bytes({"truncate": data[:len(data) // 2], "empty": b"", "junk": b"\x00not a file saelab wrote"}[how])
    return copy


def one_line_error(capsys, *names: str) -> str:
    """The error the command printed: one line (no traceback), naming each of ``names``."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    for name in names:
        assert name in errors[0], (name, errors[0])
    return errors[0]


@pytest.mark.parametrize("file,how", [("final/sae_weights.safetensors", "truncate"), ("final/cfg.json", "truncate"),
                                      ("final/cfg.json", "empty"), ("final/sae_weights.safetensors", "junk")])
def test_a_damaged_sae_folder_is_a_one_line_error(trained, tmp_path, capsys, file, how):
    run = damaged(trained, tmp_path, "run", file, how)
    capsys.readouterr()
    assert main(["eval", str(run), "--tokens", "256", "--no-downstream"]) == 2
    one_line_error(capsys, file.split("/")[-1], "damaged or cut short", "Save or download the SAE folder again")


def test_a_damaged_sparsity_file_names_itself(trained, tmp_path):
    from saelab.sae import load_sparsity

    run = damaged(trained, tmp_path, "run", "final/sparsity.safetensors", "truncate")
    with pytest.raises(ValueError, match="sparsity.safetensors is not a readable safetensors file"):
        load_sparsity(run / "final")


@pytest.mark.parametrize("how", ["truncate", "junk"])
def test_a_damaged_checkpoint_is_a_one_line_error(trained, tmp_path, capsys, how):
    run = damaged(trained, tmp_path, "run", "checkpoint.pt", how)
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    one_line_error(capsys, "checkpoint.pt", "--overwrite")


def test_a_torn_last_metrics_line_does_not_stop_a_resume(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 9, "tok')  # a kill in the middle of a log line
    assert main(["train", "--resume", str(run)]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records and records[-1]["step"] == 8  # the torn line is gone, the finished run's lines kept


@pytest.mark.parametrize("name,file,command", [
    ("multi", "multi.json", ["train", "--resume", "{copy}"]),
    ("sweep", "topk-k2/sweep_row.json", None),
    ("acts", "metadata.json", ["train", "--activations", "{copy}", "--out", "{tmp}/from-cache", *FROM_CACHE]),
    ("acts", "hooks/blocks.1.hook_resid_post/shard_00000.npy", ["train", "--activations", "{copy}", "--out",
                                                                 "{tmp}/from-cache", *FROM_CACHE]),
])
def test_damaged_run_sweep_and_cache_files_are_one_line_errors(trained, tmp_path, capsys, tiny_model_dir,
                                                               text_file, name, file, command):
    copy = damaged(trained, tmp_path, name, file, "truncate")
    if command is None:  # the sweep, run again on its folder
        command = ["sweep", "--model", str(tiny_model_dir), "--dataset", str(text_file), *TRAIN, "--architectures",
                   "topk", "--k", "2,4", "--out", "{copy}"]
    capsys.readouterr()
    assert main([part.format(copy=copy, tmp=tmp_path) for part in command]) == 2
    one_line_error(capsys, file.split("/")[-1])


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


def test_nan_activations_stop_training_naming_the_hook(tmp_path):
    from saelab.data.activations import TensorSource
    from saelab.training import TrainConfig, Trainer

    data = torch.randn(4096, 8)
    data[2500, 3] = float("nan")  # in the second unit of 2048 rows
    source = TensorSource(data, rows_per_unit=2048, columns={"blocks.3.hook_resid_post": slice(0, 8)})
    cfg = TrainConfig(architecture="topk", k=2, expansion=2, tokens=8192, batch_size=512, buffer_tokens=4096,
                      progress=False, out=str(tmp_path))
    with pytest.raises(ValueError, match=r"hook blocks.3.hook_resid_post: forward batch 1 holds 1 NaN or infinite"):
        Trainer(cfg, source, tmp_path).run()


def test_a_loss_gone_nan_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch,
                                                                           tiny_model_dir, text_file):
    from saelab.sae import TopKSAE
    from saelab.training.trainer import read_checkpoint

    original = TopKSAE.training_forward
    steps = {"n": 0}

    def diverging(self, x, step):
        out = original(self, x, step)
        steps["n"] += 1
        if steps["n"] > 5:  # from the sixth step on
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(TopKSAE, "training_forward", diverging)
    run = tmp_path / "run"
    args = ["--model", str(tiny_model_dir), "--dataset", str(text_file), *TRAIN, "--checkpoint-every-tokens", "512",
            "--log-every", "4", "--out", str(run)]
    assert main(["train", *args]) == 2
    err = one_line_error(capsys, "the loss became NaN or infinite at step 5", "last good checkpoint (step 4)",
                         "--lr")
    assert "--resume" in err
    state = read_checkpoint(run / "checkpoint.pt")
    assert state["step"] == 4 and all(bool(torch.isfinite(t).all()) for t in state["sae"].values())
    assert not (run / "final").exists()


def test_a_second_process_on_the_same_folder_is_refused(trained, tmp_path, capsys, tiny_model_dir, text_file):
    from saelab.files import folder_lock

    data = ["--model", str(tiny_model_dir), "--dataset", str(text_file)]
    busy = tmp_path / "busy"
    with folder_lock(busy):  # another process (an open file description of its own) holds the folder
        capsys.readouterr()
        assert main(["train", *data, *TRAIN, "--out", str(busy)]) == 2
        one_line_error(capsys, str(busy), "another saelab process", "choose another folder")
        assert main(["cache", *data, "--hooks", "blocks.1.hook_resid_post", "--tokens", "512", "--out", str(busy)]) == 2
        one_line_error(capsys, "another saelab process")
        assert main(["sweep", *data, *TRAIN, "--architectures", "topk", "--k", "2", "--out", str(busy)]) == 2
        one_line_error(capsys, "another saelab process")
    assert not any(busy.iterdir())  # nothing was written while it was held


@pytest.mark.subprocess
def test_a_killed_process_leaves_no_stale_lock(tmp_path):
    import signal
    import subprocess
    import sys

    from saelab.files import folder_lock

    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from saelab.files import folder_lock\n"
                               f"with folder_lock({str(folder)!r}):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(FileExistsError, match="another saelab process"):
        with folder_lock(folder):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    with folder_lock(folder):  # the operating system released the dead process's lock
        pass


def disk_full_after(limit: int, real_write):
    """A writer that puts the first ``limit`` bytes of what it is given on disk, then fails as a full disk does."""
    import errno
    import io

    def write(obj, path, *args, **kwargs):
        buffer = io.BytesIO()
        real_write(obj, buffer, *args, **kwargs)
        pathlib.Path(path).write_bytes(buffer.getvalue()[:limit])
        raise OSError(errno.ENOSPC, "No space left on device")
    return write


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(trained, tmp_path, capsys, monkeypatch,
                                                                       tiny_model_dir, text_file):
    from saelab.training.trainer import read_checkpoint

    real_save, saves = torch.save, {"n": 0}

    def save(obj, path, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 2:  # the second checkpoint hits the full disk
            return disk_full_after(1000, real_save)(obj, path, *args, **kwargs)
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", "--model", str(tiny_model_dir), "--dataset", str(text_file), *TRAIN, "--out", str(run)]) == 2
    one_line_error(capsys, "could not write the checkpoint", "checkpoint.pt", "No space left on device",
                   "the previous checkpoint is intact", "--resume")
    assert read_checkpoint(run / "checkpoint.pt")["step"] == 4 and not (run / "checkpoint.tmp").exists()
    monkeypatch.setattr(torch, "save", real_save)
    assert main(["train", "--resume", str(run)]) == 0  # space freed: the run goes on to the same SAE
    assert (run / "final" / "sae_weights.safetensors").read_bytes() == \
        (trained / "run" / "final" / "sae_weights.safetensors").read_bytes()


def test_a_full_disk_while_caching_keeps_the_shards_written(trained, tmp_path, capsys, monkeypatch, tiny_model_dir,
                                                            text_file):
    import numpy as np

    from saelab.data import cache as cache_module

    real_save, saves = np.save, {"n": 0}

    def save(path, array, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 3:  # the second shard's token ids hit the full disk
            swapped = lambda obj, file, *a, **k: real_save(file, obj, *a, **k)  # np.save takes (file, array)
            return disk_full_after(64, swapped)(array, path, *args, **kwargs)
        return real_save(path, array, *args, **kwargs)

    monkeypatch.setattr(cache_module.np, "save", save)
    acts = tmp_path / "acts"
    args = ["cache", "--model", str(tiny_model_dir), "--dataset", str(text_file), "--hooks", "blocks.1.hook_resid_post",
            "--tokens", "2048", "--context-size", "32", "--lm-batch-size", "8", "--shard-tokens", "1024",
            "--no-progress", "--out", str(acts)]
    capsys.readouterr()
    assert main(args) == 2
    one_line_error(capsys, "could not write shard 1 of the cache", "No space left on device",
                   "the shards written before are intact")
    assert not list(acts.rglob("*.tmp.npy"))
    monkeypatch.setattr(cache_module.np, "save", real_save)
    assert main(args) == 0  # the same command continues the cache, to the same files
    for path in (trained / "acts").rglob("*.npy"):
        assert path.read_bytes() == (acts / path.relative_to(trained / "acts")).read_bytes(), path


def test_outlier_rows_are_left_out_by_norm_and_recorded(tmp_path, tiny_model_dir, text_file):
    from saelab.data.activations import NormFilter, TensorSource
    from saelab.sae import SAE

    data = torch.randn(4096, 8, generator=torch.Generator().manual_seed(0))
    outliers = torch.arange(100, 4096, 400)  # 10 rows, one in the first unit
    data[outliers] *= 100
    kept = torch.cat(list(NormFilter(TensorSource(data, rows_per_unit=1024), 10.0).units(0)))
    assert len(kept) == 4096 - len(outliers) and float(kept.norm(dim=1).max()) < 10 * 3.5
    # Through a training run: recorded in the SAE's metadata; without the option nothing is recorded.
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--dataset", str(text_file), *TRAIN,
                 "--max-activation-norm-multiple", "20", "--out", str(run)]) == 0
    assert SAE.load(run / "final").cfg.metadata["max_activation_norm_multiple"] == 20.0
