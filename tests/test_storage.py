"""Caches and run folders at URLs, against a real S3 API: moto's server on 127.0.0.1 (not a mock of boto),
reached through fsspec and s3fs exactly as a bucket on AWS or any S3-compatible store would be."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("s3fs", reason="needs s3fs and moto[server] (pip install -e '.[dev]')")
pytest.importorskip("moto", reason="needs moto[server] (pip install -e '.[dev]')")

from saelab.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A fresh S3 server with a bucket ``saelab``; the environment points fsspec at it; its URL root."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = {name: os.environ.get(name) for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                     "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "SAELAB_CACHE")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
                      SAELAB_CACHE=str(tmp_path_factory.mktemp("saelab_cache")))
    import fsspec

    for _ in range(100):  # the server takes a moment to listen
        try:
            fsspec.filesystem("s3", skip_instance_cache=True).mkdir("saelab")
            break
        except Exception:
            time.sleep(0.1)
    yield "s3://saelab"
    server.terminate()
    server.wait()
    for name, value in saved.items():
        os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)


def s3fs_now():
    import fsspec

    return fsspec.filesystem("s3", skip_instance_cache=True)


CACHE = ["--hooks", "blocks.0.hook_resid_post,blocks.1.hook_resid_post", "--tokens", "4096", "--context-size", "32",
         "--lm-batch-size", "8", "--shard-tokens", "512", "--no-progress", "--device", "cpu"]
TRAIN = ["--hook", "blocks.1.hook_resid_post", "--d-sae", "64", "--k", "4", "--tokens", "4096", "--batch-size", "256",
         "--buffer-tokens", "1024", "--eval-tokens", "512", "--log-every", "4", "--checkpoint-every-tokens", "1024",
         "--no-progress", "--device", "cpu"]


def test_a_cache_written_to_s3_is_the_local_cache_and_trains_the_same_sae(s3, tiny_model_dir, text_file, tmp_path):
    model = ["--model", str(tiny_model_dir), "--dataset", str(text_file)]
    assert main(["cache", *model, *CACHE, "--out", str(tmp_path / "acts")]) == 0
    assert main(["cache", *model, *CACHE, "--out", f"{s3}/acts"]) == 0
    fs, local = s3fs_now(), tmp_path / "acts"
    stored = sorted(path[len("saelab/acts/"):] for path in fs.find("saelab/acts"))
    assert stored == sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    for name in stored:
        if name.endswith(".npy"):
            with fs.open(f"saelab/acts/{name}", "rb") as f:
                assert f.read() == (local / name).read_bytes(), name
    # The staging folder kept no shard: each went up once written.
    assert not list(Path(os.environ["SAELAB_CACHE"]).rglob("staging/*/hooks/*/*.npy"))

    assert main(["train", "--activations", str(local), *TRAIN, "--out", str(tmp_path / "from_local")]) == 0
    assert main(["train", "--activations", f"{s3}/acts", *TRAIN, "--out", str(tmp_path / "from_s3")]) == 0
    assert (tmp_path / "from_s3" / "final" / "sae_weights.safetensors").read_bytes() == \
        (tmp_path / "from_local" / "final" / "sae_weights.safetensors").read_bytes()


@pytest.mark.subprocess
def test_a_run_stored_on_s3_resumes_on_another_machine_after_a_kill(s3, tiny_model_dir, text_file, tmp_path):
    model = ["--model", str(tiny_model_dir), "--dataset", str(text_file)]
    run = [*TRAIN, "--tokens", "65536", "--eval-tokens", "0"]
    assert main(["train", *model, *run, "--out", str(tmp_path / "whole")]) == 0
    fs, url = s3fs_now(), f"{s3}/runs/r1"
    started = subprocess.Popen([sys.executable, "-m", "saelab", "train", *model, *run, "--out", url],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not fs.exists("saelab/runs/r1/checkpoint.prev.pt") and started.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    started.kill()  # the machine is lost, with its staging folder
    started.wait()
    assert started.returncode == -9, started.stderr.read()[-2000:]
    assert not fs.exists("saelab/runs/r1/final")
    os.environ["SAELAB_CACHE"] = str(tmp_path / "another_machine")
    assert main(["train", "--resume", url]) == 0
    weights = "saelab/runs/r1/final/sae_weights.safetensors"
    with fs.open(weights, "rb") as f:
        assert f.read() == (tmp_path / "whole" / "final" / "sae_weights.safetensors").read_bytes()
    assert fs.exists("saelab/runs/r1/metrics.jsonl") and fs.exists("saelab/runs/r1/training_curves.png")


def test_a_new_run_refuses_a_url_that_holds_one(s3, tiny_model_dir, text_file, capsys):
    model = ["--model", str(tiny_model_dir), "--dataset", str(text_file)]
    url = f"{s3}/runs/taken"
    assert main(["train", *model, *TRAIN, "--eval-tokens", "0", "--out", url]) == 0
    capsys.readouterr()
    assert main(["train", *model, *TRAIN, "--eval-tokens", "0", "--out", url]) == 2
    assert f"{url} already holds a run" in capsys.readouterr().err


def test_reading_ahead_keeps_a_few_files_here(s3, tmp_path):
    from saelab.storage import RemoteFolder, ShardFetcher

    fs = s3fs_now()
    for i in range(8):
        fs.pipe(f"saelab/many/part_{i}.bin", bytes([i]) * 100)
    fetcher = ShardFetcher(RemoteFolder(f"{s3}/many"), ahead=2)
    for i in range(8):
        assert fetcher.path("parts", i, lambda j: f"part_{j}.bin").read_bytes() == bytes([i]) * 100
        held = [p for p in fetcher.folder.reading.rglob("*.bin")]
        assert len(held) <= 5, held  # the one before, this one and up to two ahead (and one finishing)
    with pytest.raises(FileNotFoundError, match="part_8.bin does not exist"):
        fetcher.path("parts", 8, lambda j: f"part_{j}.bin")


def test_a_missing_storage_library_or_bad_url_is_one_line(capsys, tmp_path):
    assert main(["train", "--activations", "nosuchprotocol://bucket/acts", "--out", str(tmp_path / "r")]) == 2
    assert "nosuchprotocol" in capsys.readouterr().err


@pytest.mark.subprocess
def test_a_cache_write_to_s3_killed_midway_continues_to_the_same_files(s3, tiny_model_dir, text_file, tmp_path):
    model = ["--model", str(tiny_model_dir), "--dataset", str(text_file)]
    cache = [*CACHE, "--tokens", "65536"]
    assert main(["cache", *model, *cache, "--out", str(tmp_path / "acts")]) == 0
    fs, url = s3fs_now(), f"{s3}/killed"
    started = subprocess.Popen([sys.executable, "-m", "saelab", "cache", *model, *cache, "--out", url],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not fs.exists("saelab/killed/progress/shard_00003.json") and started.poll() is None \
            and time.time() < deadline:
        time.sleep(0.01)
    started.kill()
    started.wait()
    assert started.returncode == -9, started.stderr.read()[-2000:]
    os.environ["SAELAB_CACHE"] = str(tmp_path / "another_machine")
    assert main(["cache", *model, *cache, "--out", url]) == 0  # the same command continues it
    local = tmp_path / "acts"
    stored = sorted(path[len("saelab/killed/"):] for path in fs.find("saelab/killed"))
    assert stored == sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    for name in stored:
        with fs.open(f"saelab/killed/{name}", "rb") as f:
            assert f.read() == (local / name).read_bytes(), name
