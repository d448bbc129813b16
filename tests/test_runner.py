"""SAELens-style config and runner: the names map onto TrainConfig, and the issue's example trains end to end
(a tiny local model folder for gpt2-small, tiny token counts)."""

import json
import warnings

import pytest
import torch

from saelab import SAE, LanguageModelSAERunnerConfig, SAETrainingRunner
from saelab.compat.saelens import TL_TO_HF


def issue_example(**overrides) -> dict:
    """The config of the issue, word for word, except where ``overrides`` say."""
    return {**dict(model_name="gpt2-small", hook_name="blocks.8.hook_resid_pre", d_in=768,
                   architecture="topk", activation_fn_kwargs={"k": 50}, d_sae=768 * 8, lr=4e-4, l1_coefficient=8e-5,
                   l1_warm_up_steps=1000, train_batch_size_tokens=4096, training_tokens=100_000_000,
                   dataset_path="monology/pile-uncopyrighted", context_size=128, log_to_wandb=True,
                   wandb_project="sae-training", checkpoint_path="checkpoints", n_checkpoints=5,
                   use_ghost_grads=True), **overrides}


def test_issue_example_maps_onto_train_config():
    cfg = LanguageModelSAERunnerConfig(**issue_example())
    with pytest.warns(UserWarning, match="use_ghost_grads is for the standard architecture"):
        train = cfg.to_train_config()
    assert (train.model, train.hook, train.architecture, train.k, train.d_sae) == (
        "gpt2", "blocks.8.hook_resid_pre", "topk", 50, 6144)
    assert (train.lr, train.l1_coefficient, train.batch_size, train.tokens, train.context_size) == (
        4e-4, 8e-5, 4096, 100_000_000, 128)
    assert train.dataset == "monology/pile-uncopyrighted"
    assert train.l1_warmup_fraction == pytest.approx(1000 / (100_000_000 // 4096))
    assert train.checkpoint_every_tokens == 20_000_000
    assert train.wandb is True and train.wandb_project == "sae-training"
    assert train.dead_latent_remedy == "auto"  # topk keeps AuxK; ghost grads are for the standard SAE


def test_standard_architecture_and_step_counts():
    cfg = LanguageModelSAERunnerConfig(
        model_name="EleutherAI/pythia-70m", hook_name="blocks.2.hook_resid_post", architecture="standard",
        expansion_factor=4, use_ghost_grads=True, train_batch_size_tokens=1000, training_tokens=100_000,
        lr_warm_up_steps=10, lr_decay_steps=20, dead_feature_window=50, store_batch_size_prompts=4,
        n_batches_in_buffer=8, context_size=64, normalize_activations="none", b_dec_init_method="geometric_median",
        seed=7, n_eval_batches=3, run_name="r1")
    train = cfg.to_train_config()
    assert train.model == "EleutherAI/pythia-70m" and train.architecture == "standard" and train.expansion == 4
    assert train.dead_latent_remedy == "ghost_grads"
    assert train.lr_warmup_fraction == pytest.approx(0.1) and train.lr_decay_fraction == pytest.approx(0.2)
    assert train.dead_window_tokens == 50_000 and train.buffer_tokens == 8 * 4 * 64
    assert train.normalize_activations is False and train.b_dec_init == "median" and train.seed == 7
    assert train.eval_tokens == 3 * 4 * 64 and train.wandb_run_name == "r1"
    # pre-6.0 SAELens spelled TopK as the standard architecture with a topk activation
    old_topk = LanguageModelSAERunnerConfig(architecture="standard", activation_fn="topk",
                                            activation_fn_kwargs={"k": 12}).to_train_config()
    assert (old_topk.architecture, old_topk.k) == ("topk", 12)
    # model names: TransformerLens names with a hub twin, or through TransformerLens when asked
    assert TL_TO_HF["gpt2-small"] == "gpt2"
    assert LanguageModelSAERunnerConfig(model_name="gpt2-small", model_class_name="HookedTransformer",
                                        hook_name="blocks.0.hook_resid_pre").to_train_config().model == "tl:gpt2-small"


def test_unknown_and_unsupported_names_are_listed():
    with pytest.raises(TypeError, match=r"l1_coeficient \(did you mean l1_coefficient\?\).*not_an_option"):
        LanguageModelSAERunnerConfig(l1_coeficient=1.0, not_an_option=2)
    with pytest.raises(ValueError) as err:
        LanguageModelSAERunnerConfig(lr_scheduler_name="cosineannealing", hook_head_index=2, architecture="transcoder",
                                     use_cached_activations=True).to_train_config()
    for name in ("lr_scheduler_name", "hook_head_index", "architecture", "use_cached_activations"):
        assert name in str(err.value)
    with pytest.warns(UserWarning, match="compile_llm, dtype"):
        LanguageModelSAERunnerConfig(compile_llm=True, dtype="bfloat16", verbose=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # SAELens defaults of ignored names: no warning
        LanguageModelSAERunnerConfig(dtype="float32", streaming=True)


def test_issue_example_trains_end_to_end(tiny_model_dir, text_file, tmp_path):
    cfg = LanguageModelSAERunnerConfig(**issue_example(
        model_name=str(tiny_model_dir), hook_name="blocks.1.hook_resid_pre", d_in=32,
        activation_fn_kwargs={"k": 4}, d_sae=32 * 8, lr=4e-3, l1_warm_up_steps=10, train_batch_size_tokens=64,
        training_tokens=2560, dataset_path=str(text_file), context_size=16, log_to_wandb=False,
        checkpoint_path=str(tmp_path / "checkpoints"), store_batch_size_prompts=8, n_batches_in_buffer=16,
        n_eval_batches=2))
    with pytest.warns(UserWarning, match="use_ghost_grads"):
        runner = SAETrainingRunner(cfg)
    sae = runner.run()
    assert isinstance(sae, SAE) and (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k) == (32, 256, 4)
    assert runner.run_dir.parent == tmp_path / "checkpoints"
    saved = SAE.load(runner.run_dir / "final")
    torch.testing.assert_close(saved.W_dec, sae.W_dec)
    assert saved.cfg.metadata["hook_name"] == "blocks.1.hook_resid_pre"
    # n_checkpoints=5: a checkpoint every 512 of the 2560 tokens
    assert runner.train_config.checkpoint_every_tokens == 512
    assert (runner.run_dir / "checkpoint.pt").exists()
    # SAELens's README example ends by reading the held-out evaluation off the runner.
    eval_json = json.loads((runner.run_dir / "eval.json").read_text())
    assert runner.metrics["l0"] == eval_json["l0"] and 0 < runner.metrics["l0"] <= 4
    assert runner.metrics["ce_loss_score"] == eval_json["ce_loss_score"]

    # a d_in that is not the hook's width is refused before training
    wrong = LanguageModelSAERunnerConfig(**issue_example(
        model_name=str(tiny_model_dir), hook_name="blocks.1.hook_resid_pre", d_in=768, use_ghost_grads=False,
        log_to_wandb=False, checkpoint_path=str(tmp_path / "wrong")))
    with pytest.raises(ValueError, match="d_in=768 but hook 'blocks.1.hook_resid_pre'.*width 32"):
        SAETrainingRunner(wrong).run()
