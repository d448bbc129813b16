"""W&B tracking, offline: what a run logs is read back from the offline run's transaction log (run-*.wandb)."""

import json
import struct
import sys

import pytest

from conftest import synthetic_activations
from saelab.cli import main
from saelab.data import TensorSource
from saelab.training import TrainConfig, Trainer
from saelab.training.tracking import WANDB_RUN_FILE, start_tracking

pytest.importorskip("wandb")

LOG_BLOCK = 32 * 1024  # the .wandb file is a LevelDB-style log: 32 KiB blocks of (crc, length, type) records
HEADER = 7             # ":W&B" + magic (2 bytes) + version (1 byte), and again the size of a record header


def wandb_records(path):
    """Every protobuf Record of an offline run's .wandb file (wandb >= 0.2x ships no Python reader)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        room = LOG_BLOCK - pos % LOG_BLOCK
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if room < HEADER or (kind == 0 and length == 0):  # block trailer padding
            pos += room
            continue
        pending += data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):  # a whole record, or the last fragment of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def read_offline_run(run_folder):
    """(run record, history rows as {key: json value}, summary {key: json value}, artifacts) of one offline run."""
    import wandb

    wandb.teardown()  # run.finish() can return before W&B's service has written everything: wait for it
    (log,) = run_folder.glob("run-*.wandb")
    run, history, summary, artifacts = None, [], {}, []
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind == "summary":
            summary.update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in record.summary.update})
        elif kind == "artifact":
            artifacts.append(record.artifact)
    return run, history, summary, artifacts


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    folder = tmp_path / "wandb_dir"
    folder.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(folder))
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_SILENT", "true")
    return folder


@pytest.mark.slow
def test_train_with_wandb_logs_metrics_density_eval_and_the_sae(tiny_model_dir, tmp_path, offline_wandb):
    out = tmp_path / "run"
    code = main(["train", "--model", str(tiny_model_dir), "--hook", "blocks.1.hook_resid_post", "--d-sae", "64",
                 "--k", "4", "--tokens", "8192", "--batch-size", "256", "--buffer-tokens", "4096",
                 "--context-size", "64", "--lm-batch-size", "4", "--eval-tokens", "256", "--log-every", "4",
                 "--dead-window-tokens", "2048", "--no-progress", "--device", "cpu", "--out", str(out),
                 "--wandb", "--wandb-project", "saelab-test"])
    assert code == 0
    (run_folder,) = (offline_wandb / "wandb").glob("offline-run-*")
    run, history, summary, artifacts = read_offline_run(run_folder)
    assert run.run_id == json.loads((out / WANDB_RUN_FILE).read_text())["id"]

    # Every metrics.jsonl record, at its step.
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = {row["_step"]: row for row in history if "loss" in row}
    assert sorted(logged) == [r["step"] for r in records]
    for record in records:
        for key in ("loss", "mse", "l0", "fvu", "dead_fraction", "lr", "tokens_per_second"):
            assert logged[record["step"]][key] == pytest.approx(record[key]), key
    # A firing-frequency histogram at each dead-window boundary (2048 tokens = every 8 steps of 256).
    density = [row for row in history if "density/log10_firing_frequency/_type" in row]
    assert [row["_step"] for row in density] == [8, 16, 24, 32]
    assert all(sum(row["density/log10_firing_frequency/values"]) == 64 for row in density)  # one count per latent
    # The final evaluation in the summary, and the SAE folder as a model artifact.
    evaluation = json.loads((out / "eval.json").read_text())
    assert summary["eval/explained_variance"] == pytest.approx(evaluation["explained_variance"])
    assert summary["eval/l0"] == pytest.approx(evaluation["l0"])
    histogram = summary["eval/log10_firing_frequency"]
    assert histogram["_type"] == "histogram" and sum(histogram["values"]) == 64
    (artifact,) = artifacts
    assert artifact.type == "model"
    assert {entry.path for entry in artifact.manifest.contents} >= {"cfg.json", "sae_weights.safetensors"}
    assert json.loads(artifact.metadata)["hook_name"] == "blocks.1.hook_resid_post"


def test_resume_continues_the_same_wandb_run_after_its_checkpoint(tmp_path, offline_wandb):
    data, _ = synthetic_activations(4_000, d_in=16, n_features=32, active=3)
    cfg = TrainConfig(out=str(tmp_path / "run"), d_sae=32, k=3, tokens=10_240, batch_size=256, buffer_tokens=2048,
                      checkpoint_every_tokens=2560, log_every=2, progress=False, device="cpu", wandb=True)

    def run(resume, on_step=None):
        tracker = start_tracking(cfg, cfg.out, resume=resume)
        result = Trainer(cfg, TensorSource(data), cfg.out, tracker=tracker).run(resume=resume, on_step=on_step)
        tracker.finish(result.completed)
        return result

    def stop_at_step_15(trainer):
        if trainer.step == 15:
            trainer.request_stop()

    assert not run(False, stop_at_step_15).completed
    assert run(True).completed
    runs = sorted((offline_wandb / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    (first_run, first, _, _), (second_run, second, _, _) = (read_offline_run(folder) for folder in runs)
    assert first_run.run_id == second_run.run_id  # one W&B run, continued
    first_steps = [row["_step"] for row in first if "loss" in row]
    second_steps = [row["_step"] for row in second if "loss" in row]
    assert first_steps == list(range(2, 15, 2))
    # Stopping wrote a checkpoint at step 15; the resumed process logs from there on: every log step once.
    assert first_steps + second_steps == list(range(2, 41, 2))


def test_wandb_without_the_package_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(RuntimeError, match=r"pip install 'saelab\[wandb\]'"):
        start_tracking(TrainConfig(wandb=True, out=str(tmp_path)), tmp_path)
    assert main(["train", "--wandb", "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "saelab[wandb]" in capsys.readouterr().err


def test_without_wandb_nothing_is_tracked(tmp_path, offline_wandb):
    data, _ = synthetic_activations(2_000, d_in=16, n_features=32, active=3)
    cfg = TrainConfig(out=str(tmp_path / "run"), d_sae=32, k=3, tokens=2048, batch_size=256, buffer_tokens=2048,
                      progress=False, device="cpu")
    tracker = start_tracking(cfg, cfg.out)
    Trainer(cfg, TensorSource(data), cfg.out, tracker=tracker).run()
    tracker.finish()
    assert not (offline_wandb / "wandb").exists() and not (tmp_path / "run" / WANDB_RUN_FILE).exists()
    assert (tmp_path / "run" / "metrics.jsonl").read_text()


def test_saes_trained_together_get_a_wandb_run_each_in_one_group(tiny_model_dir, tmp_path, offline_wandb):
    out = tmp_path / "multi"
    assert main(["train", "--model", str(tiny_model_dir), "--hook", "blocks.0.hook_resid_post,blocks.1.hook_resid_post",
                 "--d-sae", "64", "--k", "4", "--tokens", "2048", "--batch-size", "256", "--buffer-tokens", "2048",
                 "--context-size", "64", "--lm-batch-size", "4", "--eval-tokens", "0", "--log-every", "4",
                 "--no-progress", "--device", "cpu", "--out", str(out), "--wandb"]) == 0
    runs = [read_offline_run(folder) for folder in (offline_wandb / "wandb").glob("offline-run-*")]
    sae_runs = json.loads((out / "multi.json").read_text())["runs"]
    assert sorted(run.run_id for run, *_ in runs) == sorted(
        json.loads((out / sae_run / WANDB_RUN_FILE).read_text())["id"] for sae_run in sae_runs)
    for run, history, summary, artifacts in runs:
        assert run.run_group == "multi"
        assert [row["_step"] for row in history if "loss" in row] == [4, 8]
        (artifact,) = artifacts
        assert artifact.type == "model"
