"""SAELens-style training: ``LanguageModelSAERunnerConfig`` and ``SAETrainingRunner``, a thin adapter onto
saelab's own ``TrainConfig`` and ``saelab.training.train``.

Code written for SAELens's flat runner config runs with only the import changed::

    cfg = LanguageModelSAERunnerConfig(model_name="gpt2-small", hook_name="blocks.8.hook_resid_pre", d_in=768,
                                       architecture="topk", activation_fn_kwargs={"k": 50}, d_sae=768 * 8, ...)
    trainer = SAETrainingRunner(cfg)
    sae = trainer.run()
    trainer.metrics["l0"], trainer.metrics["ce_loss_score"]    # the held-out evaluation

How each SAELens name maps onto ``TrainConfig`` is written once, in the tables below: ``SAME`` (names with
the same meaning; an option left out, or None, keeps saelab's default), ``CONVERTED`` (names
``to_train_config`` converts: model names via ``TL_TO_HF`` and ``model_class_name``, step and batch counts to
fractions and token counts, ``use_ghost_grads`` to the ghost-grads remedy where the architecture takes it,
``checkpoint_path``/``run_name`` to the run folder, ``output_path`` a copy of the final SAE), ``ONLY_DEFAULT``
(settings saelab supports only at SAELens's default) and ``IGNORED``. ``l1_coefficient`` is in saelab's
units (inputs scaled to mean norm sqrt(d_in)): retune it.

SAELens names saelab has no use for (compilation, dtype, logging cadence, ...) are accepted; set to anything
but SAELens's default they give one warning that lists them. Settings saelab cannot honour (another
learning-rate schedule, cached activations, hook_head_index, ...) raise one error that lists them all.
Unknown names raise a TypeError that lists them, with the nearest known names.
"""

from __future__ import annotations

import copy
import difflib
import re
import shutil
import time
import warnings
from dataclasses import replace
from pathlib import Path

from saelab.sae import architecture as saelab_architecture
from saelab.training import TrainConfig, train

# TransformerLens names whose weights are a Hugging Face hub model: saelab loads that by default.
TL_TO_HF = {"gpt2-small": "gpt2", "gpt2-medium": "gpt2-medium", "gpt2-large": "gpt2-large", "gpt2-xl": "gpt2-xl",
            **{f"pythia-{size}{suffix}": f"EleutherAI/pythia-{size}{suffix}"
               for size in ("14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")
               for suffix in ("", "-deduped")},
            "gemma-2b": "google/gemma-2b", "gemma-2b-it": "google/gemma-2b-it", "gemma-2-2b": "google/gemma-2-2b",
            "gemma-2-2b-it": "google/gemma-2-2b-it", "gemma-2-9b": "google/gemma-2-9b"}
# SAELens's architecture names -> saelab's (the one place outside saelab.sae that names architectures).
ARCHITECTURES = {"standard": "standard", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated",
                 "batchtopk": "batchtopk", "matryoshka_batchtopk": "matryoshka_batchtopk"}
NORMALIZATION = {"none": False, "expected_average_only_in": True}
B_DEC_INIT = {"geometric_median": "median", "mean": "mean", "zeros": "zeros"}
# SAELens names that do not change what saelab trains, with SAELens's defaults: another value warns.
IGNORED = {"model_kwargs": {}, "model_from_pretrained_kwargs": None, "dataset_trust_remote_code": True,
           "streaming": True, "is_dataset_tokenized": True, "hook_eval": "NOT_IN_USE", "dtype": "float32",
           "llm_device": None, "act_store_device": None, "autocast": False, "autocast_lm": False,
           "compile_llm": False, "llm_compilation_mode": None, "compile_sae": False, "sae_compilation_mode": None,
           "adam_beta1": 0.0, "adam_beta2": 0.999, "mse_loss_normalization": None, "lp_norm": 1.0,
           "scale_sparsity_penalty_by_decoder_norm": False, "decoder_heuristic_init": False,
           "init_encoder_as_decoder_transpose": False, "normalize_sae_decoder": True, "noise_scale": 0.0,
           "decoder_orthogonal_init": False, "feature_sampling_window": 2000, "dead_feature_threshold": 1e-8,
           "eval_every_n_wandb_logs": 100,
           "wandb_log_frequency": 10, "wandb_id": None, "verbose": True, "sae_lens_version": None,
           "sae_lens_training_version": None, "save_final_checkpoint": False, "lr_end": None,
           "n_restart_cycles": 1, "use_chat_formatting": False, "activations_mixing_fraction": 0.5,
           "prefetch_llm_batches": False, "n_batches_for_norm_estimate": 1000, "log_activations_store_to_wandb": False,
           "log_optimizer_state_to_wandb": False, "finetuning_tokens": 0, "finetuning_method": None}


# SAELens names with the same meaning as a TrainConfig field (SAELens name -> saelab name).
SAME = {"hook_name": "hook", "d_sae": "d_sae", "expansion_factor": "expansion", "lr": "lr",
        "l1_coefficient": "l1_coefficient", "l0_coefficient": "l0_coefficient",
        "jumprelu_bandwidth": "jumprelu_bandwidth", "jumprelu_init_threshold": "jumprelu_init_threshold",
        "train_batch_size_tokens": "batch_size", "training_tokens": "tokens", "context_size": "context_size",
        "dataset_path": "dataset", "prepend_bos": "prepend_bos", "exclude_special_tokens": "exclude_special_tokens",
        "store_batch_size_prompts": "lm_batch_size", "seed": "seed", "device": "device", "log_to_wandb": "wandb",
        "wandb_project": "wandb_project", "wandb_entity": "wandb_entity", "run_name": "wandb_run_name"}
# SAELens names to_train_config converts, with their SAELens defaults.
CONVERTED = {"model_name": None, "model_class_name": None, "hook_layer": None, "d_in": None, "architecture": None,
             "activation_fn": None, "activation_fn_kwargs": {}, "lr_scheduler_name": None, "lr_warm_up_steps": None,
             "lr_decay_steps": None, "l1_warm_up_steps": None, "n_batches_in_buffer": None, "n_eval_batches": None,
             "eval_batch_size_prompts": None, "checkpoint_path": "checkpoints", "n_checkpoints": 0,
             "output_path": None, "use_ghost_grads": False, "dead_feature_window": None,
             "normalize_activations": None, "b_dec_init_method": None}
# SAELens settings saelab can only take at their SAELens default.
ONLY_DEFAULT = {"hook_head_index": None, "apply_b_dec_to_input": True, "use_cached_activations": False,
                "cached_activations_path": None, "seqpos_slice": (None,), "disable_concat_sequences": False,
                "sequence_separator_token": "bos", "from_pretrained_path": None, "resume_from_checkpoint": None}


class LanguageModelSAERunnerConfig:
    """SAELens's flat training-runner config: every name of SAME, CONVERTED and ONLY_DEFAULT is an attribute
    (SAELens's default when not given); ``ignored`` holds the given names of IGNORED."""

    def __init__(self, **kwargs):
        known = {**dict.fromkeys(SAME), **CONVERTED, **ONLY_DEFAULT}
        unknown = sorted(set(kwargs) - set(known) - set(IGNORED))
        if unknown:
            hints = ", ".join(_with_suggestion(name, [*known, *IGNORED]) for name in unknown)
            raise TypeError(f"LanguageModelSAERunnerConfig got unknown option(s): {hints}")
        for name, default in known.items():
            setattr(self, name, kwargs.get(name, copy.copy(default)))
        self.ignored = {name: kwargs[name] for name in IGNORED if name in kwargs}
        changed = sorted(name for name, value in self.ignored.items() if value != IGNORED[name])
        if changed:
            warnings.warn(f"saelab ignores these SAELens options (they do not change what it trains): "
                          f"{', '.join(changed)}", stacklevel=2)

    @property
    def resolved_architecture(self) -> str:
        """saelab's name for the architecture this config asks for."""
        if self.activation_fn == "topk" and self.architecture in (None, "standard"):  # pre-6.0 SAELens's TopK
            return ARCHITECTURES["topk"]
        return ARCHITECTURES.get(self.architecture, self.architecture) if self.architecture else TrainConfig.architecture

    def to_train_config(self) -> TrainConfig:
        """The ``TrainConfig`` this stands for; raises ValueError listing every setting saelab cannot honour."""
        self._check_supported()
        architecture = self.resolved_architecture
        given: dict = {ours: getattr(self, theirs) for theirs, ours in SAME.items()}
        given.update(model=self.resolved_model(), architecture=architecture, k=self.activation_fn_kwargs.get("k"))
        if self.normalize_activations is not None:
            given["normalize_activations"] = NORMALIZATION[self.normalize_activations]
        if self.b_dec_init_method is not None:
            given["b_dec_init"] = B_DEC_INIT[self.b_dec_init_method]
        if self.use_ghost_grads:
            if saelab_architecture(architecture).accepts_remedy("ghost_grads"):
                given["dead_latent_remedy"] = "ghost_grads"
            else:
                warnings.warn(f"use_ghost_grads is for the standard architecture; the {architecture} SAE keeps "
                              "saelab's dead-latent remedy (AuxK for the TopK family)", stacklevel=2)
        base = TrainConfig(**{name: value for name, value in given.items() if value is not None})
        return replace(base, **self._token_counts(base))

    def _token_counts(self, base: TrainConfig) -> dict:
        """Settings SAELens counts in steps or batches, converted with the batch size and token budget."""
        steps = max(1, base.tokens // base.batch_size)
        out: dict = {}
        for name, target in (("l1_warm_up_steps", "l1_warmup_fraction"), ("lr_warm_up_steps", "lr_warmup_fraction"),
                             ("lr_decay_steps", "lr_decay_fraction")):
            if getattr(self, name) is not None:
                out[target] = min(1.0, getattr(self, name) / steps)
        if self.lr_scheduler_name == "constant" and self.lr_decay_steps is None:
            out["lr_decay_fraction"] = 0.0
        if self.dead_feature_window is not None:
            out["dead_window_tokens"] = self.dead_feature_window * base.batch_size
        if self.n_eval_batches is not None or self.eval_batch_size_prompts is not None:
            prompts = self.eval_batch_size_prompts or base.lm_batch_size
            out["eval_tokens"] = (10 if self.n_eval_batches is None else self.n_eval_batches) * prompts \
                * base.context_size
        if self.n_batches_in_buffer is not None:
            out["buffer_tokens"] = max(base.batch_size,
                                       self.n_batches_in_buffer * base.lm_batch_size * base.context_size)
        out["checkpoint_every_tokens"] = max(1, base.tokens // self.n_checkpoints) if self.n_checkpoints > 0 \
            else base.tokens
        return out

    def resolved_model(self) -> str | None:
        """The model name saelab loads (see TL_TO_HF and model_class_name)."""
        name = self.model_name
        if name is None or Path(name).expanduser().exists():
            return name
        if self.model_class_name == "HookedTransformer":
            return f"tl:{name}"
        return TL_TO_HF.get(name, name)

    def _check_supported(self) -> None:
        problems = []
        if self.architecture is not None and self.architecture not in ARCHITECTURES:
            problems.append(f"architecture {self.architecture!r} (saelab trains {', '.join(ARCHITECTURES)})")
        if self.activation_fn not in (None, "relu", "topk"):
            problems.append(f"activation_fn {self.activation_fn!r} (relu or topk)")
        if set(self.activation_fn_kwargs) - {"k"}:
            problems.append(f"activation_fn_kwargs {sorted(set(self.activation_fn_kwargs) - {'k'})} (only k)")
        if self.model_class_name not in (None, "HookedTransformer", "AutoModelForCausalLM"):
            problems.append(f"model_class_name {self.model_class_name!r} (HookedTransformer or AutoModelForCausalLM)")
        if self.lr_scheduler_name not in (None, "constant", "linear"):
            problems.append(f"lr_scheduler_name {self.lr_scheduler_name!r} (saelab's schedule is linear warm-up, "
                            "constant, linear decay: use constant with lr_warm_up_steps / lr_decay_steps)")
        if self.normalize_activations not in (None, *NORMALIZATION):
            problems.append(f"normalize_activations {self.normalize_activations!r} ({', '.join(NORMALIZATION)})")
        if self.b_dec_init_method not in (None, *B_DEC_INIT):
            problems.append(f"b_dec_init_method {self.b_dec_init_method!r} ({', '.join(B_DEC_INIT)})")
        for name, default in ONLY_DEFAULT.items():
            value = getattr(self, name)
            value = tuple(value) if isinstance(value, list) else value  # a config read from JSON has lists
            if value != default and not (name == "sequence_separator_token" and value is None):  # None: also BOS
                problems.append(f"{name}={getattr(self, name)!r} (saelab supports only {default!r})")
        if self.hook_layer is not None and self.hook_name and not re.match(rf"^blocks\.{self.hook_layer}\.",
                                                                          self.hook_name):
            problems.append(f"hook_layer={self.hook_layer} does not match hook_name {self.hook_name!r}")
        if self.n_checkpoints < 0:
            problems.append(f"n_checkpoints must not be negative (got {self.n_checkpoints})")
        if problems:
            raise ValueError("LanguageModelSAERunnerConfig settings saelab cannot honour: " + "; ".join(problems))


class SAETrainingRunner:
    """``SAETrainingRunner(cfg).run()`` trains the SAE (``saelab.training.train``) and returns it; then
    ``metrics`` holds its held-out evaluation (SAELens's key names: l0, explained_variance, ce_loss_score, ...)
    and ``run_dir`` its run folder.

    ``override_model``: an already loaded model to train on instead of loading ``cfg.model_name``: a
    TransformerLens HookedTransformer (its tokenizer is used) or a ``(model, tokenizer)`` pair.
    ``override_dataset``: a dataset name or path standing in for ``cfg.dataset_path``.
    """

    def __init__(self, cfg: LanguageModelSAERunnerConfig, override_dataset: str | None = None,
                 override_model=None, override_sae=None):
        if override_sae is not None:
            raise ValueError("override_sae is not supported: saelab starts every SAE from its own initialisation")
        if override_dataset is not None and not isinstance(override_dataset, (str, Path)):
            raise ValueError("override_dataset must be a dataset name or path (saelab streams text itself); "
                             "save a datasets.Dataset with save_to_disk and pass its folder")
        self.cfg = cfg
        self.train_config = cfg.to_train_config()
        if override_dataset is not None:
            self.train_config = replace(self.train_config, dataset=str(override_dataset))
        self.model_and_tokenizer = _model_and_tokenizer(override_model)
        self.run_dir: Path | None = None  # set by run()
        self.metrics: dict = {}           # set by run(): the held-out evaluation

    def run(self):
        """Train, evaluate and save the SAE (``<run_dir>/final``, SAELens format); returns the SAE."""
        import torch

        from saelab.data.tokens import bos_id
        from saelab.models import hook_widths, load_model, resolve_hook

        self.run_dir = _fresh_run_dir(Path(self.cfg.checkpoint_path), self.cfg.run_name)
        cfg = replace(self.train_config, out=str(self.run_dir))
        model, tokenizer = self.model_and_tokenizer or load_model(cfg.model, cfg.device)
        if self.cfg.d_in is not None:
            hook = resolve_hook(model, cfg.hook)
            width = hook_widths(model, [hook], bos_id(tokenizer))[hook.name]
            if width != self.cfg.d_in:
                raise ValueError(f"d_in={self.cfg.d_in} but hook {cfg.hook!r} of {cfg.model} has width {width}; "
                                 "fix d_in or hook_name")
        summary = train([cfg], model_and_tokenizer=(model, tokenizer))[0]
        self.metrics = {name: value for name, value in summary.metrics.items() if not torch.is_tensor(value)}
        if self.cfg.output_path is not None and summary.completed:
            shutil.copytree(self.run_dir / "final", self.cfg.output_path, dirs_exist_ok=True)
        return summary.sae


def _with_suggestion(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f"{name} (did you mean {close[0]}?)" if close else name


def _model_and_tokenizer(override_model):
    if override_model is None:
        return None
    if isinstance(override_model, tuple):
        return override_model
    tokenizer = getattr(override_model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("override_model has no tokenizer attribute; pass (model, tokenizer)")
    return override_model, tokenizer


def _fresh_run_dir(checkpoint_path: Path, run_name: str | None) -> Path:
    """``<checkpoint_path>/<run_name>`` (which must not hold a run yet), else a new timestamped folder."""
    if run_name:
        folder = checkpoint_path / run_name
        if folder.exists() and any(folder.iterdir()):
            raise FileExistsError(f"{folder} already holds a run; choose another run_name or checkpoint_path")
        return folder
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder, n = checkpoint_path / stamp, 1
    while folder.exists():
        n += 1
        folder = checkpoint_path / f"{stamp}-{n}"
    return folder
