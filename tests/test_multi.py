"""Several SAEs from one forward pass: SAEs trained together equal the same SAEs trained alone, the model
runs once per batch of contexts for all of them, and an interrupted multi-SAE run resumes exactly."""

import json
from dataclasses import replace

import pytest
import torch

from conftest import synthetic_activations
from saelab import SAE
from saelab.cli import main
from saelab.data import activations
from saelab.data.activations import ActivationBuffer, TensorSource, prefetched
from saelab.options import parse_list
from saelab.training.config import check_shared, expand
from saelab.training.run import train as train_many
from saelab.training import TrainConfig, Trainer
from saelab.training.lockstep import MultiTrainer, SharedBuffer

HOOKS = ("blocks.0.hook_resid_post", "blocks.2.hook_resid_post")
CONTEXT = 32


@pytest.fixture(autouse=True)
def one_thread():
    """Tensors this small run fastest on one thread, which also keeps a busy machine's thread contention
    (each op waiting on a descheduled worker) out of the test's time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def forwards(monkeypatch):
    """The hooks captured by each model forward over training contexts (not the sources' shape probes)."""
    calls = []
    original = activations.capture

    def capture(model, input_ids, hooks, *args, **kwargs):
        if input_ids.shape[-1] == CONTEXT:
            calls.append([h.name for h in hooks])
        return original(model, input_ids, hooks, *args, **kwargs)

    monkeypatch.setattr(activations, "capture", capture)
    return calls


def lm_config(model_dir, text_file, out, **overrides):
    base = dict(model=str(model_dir), dataset=str(text_file), out=str(out), tokens=6144, batch_size=256,
                lr=3e-3, context_size=CONTEXT, lm_batch_size=8, buffer_tokens=2048, eval_tokens=256,
                dead_window_tokens=1024, log_every=4, checkpoint_every_tokens=2048, expansion=4, progress=False)
    return TrainConfig(**{**base, **overrides})


def two_saes(model_dir, text_file, out):
    """A TopK SAE after block 0 and a BatchTopK SAE after block 2."""
    base = lm_config(model_dir, text_file, out)
    return [replace(base, hook=HOOKS[0], architecture="topk", k=4, out=str(out / "a")),
            replace(base, hook=HOOKS[1], architecture="batchtopk", k=8, out=str(out / "b"))]


def assert_same_sae(one: SAE, other: SAE):
    for name, tensor in one.state_dict().items():
        assert torch.allclose(tensor, other.state_dict()[name], atol=1e-6), name


def test_saes_trained_together_equal_each_trained_alone(tiny_model_dir, text_file, tmp_path, forwards):
    together = train_many(two_saes(tiny_model_dir, text_file, tmp_path / "together"))
    shared_forwards = list(forwards)
    assert shared_forwards and all(hooks == list(HOOKS) for hooks in shared_forwards)
    forwards.clear()
    alone = [train_many([cfg])[0] for cfg in two_saes(tiny_model_dir, text_file, tmp_path / "alone")]
    # The model ran once per batch of contexts for both SAEs: as often as for either one alone.
    assert forwards == [[HOOKS[0]]] * len(shared_forwards) + [[HOOKS[1]]] * len(shared_forwards)
    for joint, single in zip(together, alone):
        assert joint.completed and single.completed
        assert_same_sae(joint.sae, single.sae)
        assert joint.metrics["explained_variance"] == pytest.approx(single.metrics["explained_variance"], abs=1e-6)
        assert (joint.run_dir / "final" / "cfg.json").exists() and (joint.run_dir / "eval.json").exists()
        assert (joint.run_dir / "metrics.jsonl").read_text() and (joint.run_dir / "checkpoint.pt").exists()
    assert SAE.load(together[1].run_dir / "final").cfg.metadata["hook_name"] == HOOKS[1]


def test_two_configs_on_one_hook_share_its_columns(tiny_model_dir, text_file, tmp_path, forwards):
    base = lm_config(tiny_model_dir, text_file, tmp_path, hook=HOOKS[1])
    configs = expand(base, {"k": [2, 6]})
    assert [c.out for c in configs] == [str(tmp_path / f"{HOOKS[1]}-topk-k{k}") for k in (2, 6)]
    results = train_many(configs)
    assert all(forward == [HOOKS[1]] for forward in forwards)
    l0s = [r.metrics["l0"] for r in results]
    assert 0 < l0s[0] <= 2 < l0s[1] <= 6


def test_the_forward_pass_runs_once_per_unit_for_every_hook(tiny_model_dir, text_file, tmp_path, forwards):
    cfg = lm_config(tiny_model_dir, text_file, tmp_path, eval_tokens=0)
    configs = [replace(cfg, hook=h, out=str(tmp_path / h)) for h in ("blocks.0.hook_resid_post",
                                                                     "blocks.1.hook_mlp_out",
                                                                     "blocks.2.hook_resid_post")]
    train_many(configs)
    training = forwards
    assert training and all(len(hooks) == 3 for hooks in training)
    # 2048-row blocks of 8 x 31 kept tokens per forward; 6144 training tokens read 3 blocks at most,
    # and the corpus is long enough that none is read twice.
    assert len(training) <= 3 * (2048 // (8 * 31) + 1)


def test_interrupted_multi_run_resumes_to_the_uninterrupted_result(tiny_model_dir, text_file, tmp_path,
                                                                   monkeypatch):
    args = lambda out: ["train", "--model", str(tiny_model_dir), "--dataset", str(text_file), "--out", str(out),
                        "--hook", ",".join(HOOKS), "--k", "4", "--tokens", "6144", "--batch-size", "256",
                        "--lr", "3e-3", "--context-size", "32", "--lm-batch-size", "8", "--buffer-tokens", "2048",
                        "--eval-tokens", "256", "--expansion", "4", "--no-progress", "--log-every", "4",
                        "--checkpoint-every-tokens", "2048", "--dead-window-tokens", "1024"]
    assert main(args(tmp_path / "full")) == 0
    names = json.loads((tmp_path / "full" / "multi.json").read_text())["runs"]
    assert names == [f"{h}-topk-k4" for h in HOOKS]

    original_run = MultiTrainer.run

    def run_stopping_at_step_9(self, resume=False, on_step=None):
        def stop(multi):
            if multi.trainers[0].step == 9:
                multi.request_stop()
        return original_run(self, resume=resume, on_step=None if resume else stop)

    monkeypatch.setattr(MultiTrainer, "run", run_stopping_at_step_9)
    assert main(args(tmp_path / "split")) == 130
    assert not (tmp_path / "split" / names[0] / "final").exists()
    assert main(["train", "--resume", str(tmp_path / "split")]) == 0
    for name in names:
        assert_same_sae(SAE.load(tmp_path / "full" / name / "final"), SAE.load(tmp_path / "split" / name / "final"))
        steps = [json.loads(line)["step"] for line in (tmp_path / "split" / name / "metrics.jsonl").read_text().splitlines()]
        assert steps == sorted(set(steps)) and steps[-1] == 6144 // 256


def test_shared_buffer_views_resume_exactly_on_synthetic_data(tmp_path):
    # Two "hooks" of width 16 side by side; several buffer blocks per epoch and several epochs.
    left, _ = synthetic_activations(6_000, d_in=16, n_features=32, active=3, seed=1)
    right, _ = synthetic_activations(6_000, d_in=16, n_features=32, active=3, seed=2)
    data = torch.cat([left, right], dim=1)
    cfg = TrainConfig(architecture="topk", d_sae=48, k=3, tokens=20_000, batch_size=256, lr=3e-3, buffer_tokens=2048,
                      dead_window_tokens=2_000, checkpoint_every_tokens=5_000, log_every=10, progress=False)

    def trainers(folder):
        shared = SharedBuffer(ActivationBuffer(TensorSource(data, rows_per_unit=500), cfg.buffer_tokens,
                                               cfg.batch_size, cfg.seed))
        views = [shared.view(slice(0, 16)), shared.view(slice(16, 32)), shared.view(slice(16, 32))]
        cfgs = [cfg, cfg, replace(cfg, k=5)]
        return [Trainer(replace(c, out=str(folder / str(i))), v, folder / str(i), buffer=v)
                for i, (c, v) in enumerate(zip(cfgs, views))]

    full = MultiTrainer(trainers(tmp_path / "full"), progress=False).run()
    solo = Trainer(cfg, TensorSource(right, rows_per_unit=500), tmp_path / "solo").run()
    assert_same_sae(full[1].sae, solo.sae)

    def stop_at_step_31(multi):
        if multi.trainers[0].step == 31:
            multi.request_stop()

    stopped = MultiTrainer(trainers(tmp_path / "split"), progress=False).run(on_step=stop_at_step_31)
    assert [r.completed for r in stopped] == [False] * 3 and {r.steps for r in stopped} == {31}
    resumed = MultiTrainer(trainers(tmp_path / "split"), progress=False).run(resume=True)
    for done, again in zip(full, resumed):
        assert again.completed and again.steps == done.steps
        assert_same_sae(done.sae, again.sae)


def test_runs_that_would_read_different_batches_are_refused(tmp_path):
    base = TrainConfig(out=str(tmp_path / "a"))
    with pytest.raises(ValueError, match="must share batch_size"):
        check_shared([base, replace(base, batch_size=512, out=str(tmp_path / "b"))])
    with pytest.raises(ValueError, match="a run folder"):
        check_shared([base, replace(base, k=16)])
    with pytest.raises(ValueError, match="tokens cannot take several values"):
        expand(base, {"tokens": [1, 2]})
    assert parse_list("16, 32,1_000", int) == [16, 32, 1000]
    with pytest.raises(ValueError, match="comma-separated int"):
        parse_list("16,x", int)


def test_list_options_on_the_command_line_name_bad_values(tmp_path, capsys):
    assert main(["train", "--k", "16,many", "--out", str(tmp_path)]) == 2
    assert "comma-separated int" in capsys.readouterr().err


def test_prefetched_keeps_order_forwards_errors_and_stops_when_closed():
    assert list(prefetched(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield 1
        raise OSError("disk gone")

    stream = prefetched(failing(), depth=2)
    assert next(stream) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(stream)

    produced = []

    def endless():
        while True:
            produced.append(len(produced))
            yield produced[-1]

    stream = prefetched(endless(), depth=2)
    assert [next(stream) for _ in range(5)] == [0, 1, 2, 3, 4]
    stream.close()
    count = len(produced)
    assert count <= 5 + 2 + 2  # ran at most a queue's depth (and the item in hand) ahead
    import time
    time.sleep(0.3)
    assert len(produced) == count  # and stopped


def test_a_kill_between_two_saes_checkpoints_resumes_at_their_common_step(tiny_model_dir, text_file, tmp_path,
                                                                         monkeypatch):
    """SAEs trained together write their checkpoints one after another: killed in between, the first is a
    checkpoint ahead of the second. The resume goes back to the step both have and ends where an
    uninterrupted run ends."""
    whole = train_many(two_saes(tiny_model_dir, text_file, tmp_path / "whole"))
    configs = two_saes(tiny_model_dir, text_file, tmp_path / "killed")
    original = Trainer._save_checkpoint
    saves = {"n": 0}

    class Killed(BaseException):
        pass

    def save_then_die(self):
        saves["n"] += 1
        if saves["n"] == 4:  # the second round of periodic checkpoints: the first SAE's is written, then the kill
            raise Killed
        original(self)

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train_many(configs)
    monkeypatch.setattr(Trainer, "_save_checkpoint", original)
    from saelab.training.trainer import checkpoint_steps

    steps = [sorted(checkpoint_steps(cfg.out)) for cfg in configs]
    assert steps[0] != steps[1] and set(steps[0]) & set(steps[1])  # a checkpoint apart, one step in common
    resumed = train_many(configs, resume=True)
    for joint, single in zip(resumed, whole):
        assert_same_sae(joint.sae, single.sae)
