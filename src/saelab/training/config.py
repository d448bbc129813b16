"""The training configuration. Each field's help text is also its ``saelab train --help`` entry."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

TOPK_FAMILY = ("topk", "batchtopk", "matryoshka_batchtopk")  # architectures with k (and AuxK)


def option(default, help: str, **extra):
    """A config field with its command-line help attached."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    # --- what to read -----------------------------------------------------------------------------
    model: str = option("smollm2-135m", "Language model: an embedded alias (smollm2-135m), a local "
                        "transformers folder, a .gguf file, or a Hugging Face hub id.")
    hook: str = option("blocks.6.hook_resid_post", "Hook point: a TransformerLens-style name "
                       "(blocks.L.hook_resid_pre|resid_mid|resid_post|attn_out|mlp_out) or a module path "
                       "(model.layers.6.mlp = that module's output).")
    dataset: str = option("python-docs", "Training text: a builtin corpus (python-docs = python-reference + "
                          "python-docstrings, ~300k tokens shipped with Python), "
                          "a .txt/.jsonl/.parquet file, a folder of them or a saved HF dataset, or a hub "
                          "dataset id (streamed). Rows with input_ids/tokens are used as pretokenized.")
    dataset_split: str = option("train", "Split to read from HF datasets.")
    text_column: str | None = option(None, "Column holding text (default: text/content, or input_ids/tokens).")
    context_size: int = option(128, "Tokens per context; documents are concatenated with BOS between them.")
    prepend_bos: bool = option(True, "Start every context with the BOS token.")
    exclude_special_tokens: bool = option(True, "Leave BOS/EOS/pad positions out of training and "
                                          "reconstruction metrics (their activations are huge outliers).")
    lm_batch_size: int = option(16, "Contexts per language-model forward pass.")
    activations: str | None = option(None, "Train on an activation cache written by `saelab cache` (its folder) "
                                     "instead of running the model: --hook picks one of its hooks (default: its "
                                     "only one); model, text and packing come from the cache. The final "
                                     "evaluation holds out its last --eval-tokens tokens (reconstruction "
                                     "metrics); only --eval-dataset loads the model, for CE/KL too.")
    # --- the SAE ----------------------------------------------------------------------------------
    architecture: str = option("topk", "SAE architecture: topk, batchtopk (k on average over the batch; "
                               "saved as jumprelu), matryoshka_batchtopk (alias matryoshka; nested BatchTopK "
                               "prefixes, saved as jumprelu), jumprelu (learned thresholds, L0 penalty), gated, "
                               "standard (ReLU + L1).",
                               choices=("topk", "batchtopk", "matryoshka_batchtopk", "matryoshka", "jumprelu",
                                        "gated", "standard"))
    expansion: int = option(8, "Latents per input dimension (d_sae = expansion * d_in).")
    d_sae: int | None = option(None, "Number of latents; overrides --expansion.")
    k: int = option(32, "topk: latents active per token; batchtopk, matryoshka_batchtopk: latents active "
                    "per token on average over each batch.")
    l1_coefficient: float = option(5.0, "standard, gated: weight of the L1 penalty on |f|*||W_dec|| (gated: "
                                   "on the gate's ReLU) (inputs are normalised to mean norm sqrt(d_in)).")
    l1_warmup_fraction: float = option(0.05, "standard, gated, jumprelu: fraction of training over which the "
                                       "sparsity penalty's weight (L1, or jumprelu's L0) ramps up from 0.")
    l0_coefficient: float = option(1.0, "jumprelu: weight of the L0 penalty (the loss's squared error is "
                                   "summed over dimensions of inputs normalised to mean norm sqrt(d_in)); "
                                   "with --target-l0, the weight it starts from.")
    target_l0: float | None = option(None, "jumprelu: steer the training L0 to this: each step moves every "
                                     "threshold by up to 5% toward it, and near it the L0 weight adapts "
                                     "until the thresholds stay there on their own (default: fixed weight).")
    jumprelu_bandwidth: float = option(0.05, "jumprelu: width of the straight-through estimators' "
                                       "rectangle kernel, in pre-activation units of inputs normalised to mean "
                                       "norm sqrt(d_in) (there a unit direction's projection is ~N(0,1); 0.001 "
                                       "at unit mean squared norm, as in Gemma Scope, is ~0.05 here for d_in "
                                       "~2300).")
    jumprelu_init_threshold: float = option(0.5, "jumprelu: initial threshold of every latent, in the same "
                                            "units. The log-thresholds are learned 10x faster than the other "
                                            "weights (up to ~10 * lr per step), so they can travel an order of "
                                            "magnitude in a few hundred steps.")
    threshold_ema_rate: float = option(0.1, "batchtopk, matryoshka_batchtopk: per-step rate of the moving "
                                       "average of the smallest selected activation, the saved JumpReLU "
                                       "threshold. It must follow the encoder to the end of training: a slow "
                                       "average (0.01) lags behind and fires fewer than k latents.")
    matryoshka_widths: str | None = option(None, "matryoshka_batchtopk: nested prefix widths, strictly "
                                           "increasing: latent counts (128,512,4608) or fractions of d_sae "
                                           "(1/16,0.25,1); d_sae is added as the last (default "
                                           "1/16,1/8,1/4,1/2,1).")
    aux_k: int | None = option(None, "topk, batchtopk, matryoshka_batchtopk: dead latents used by the AuxK "
                               "loss (default d_in / 2).")
    aux_coefficient: float = option(1 / 32, "topk, batchtopk, matryoshka_batchtopk: weight of the AuxK loss "
                                    "(0 turns it off); used when --dead-latent-remedy is auxk (auto for these).")
    dead_window_tokens: int = option(200_000, "A latent silent for this many training tokens counts as dead.")
    dead_latent_remedy: str = option("auto", "What revives dead latents: auxk (topk, batchtopk, "
                                     "matryoshka_batchtopk: the AuxK loss, weight --aux-coefficient), ghost_grads "
                                     "(standard: dead latents' exp(pre-activation) reconstruct the residual, an "
                                     "extra loss as large as the reconstruction loss, Anthropic Jan 2024), "
                                     "resample (any architecture: every --resample-every-tokens, dead latents "
                                     "are re-initialised toward badly reconstructed inputs, Towards "
                                     "Monosemanticity), none; auto = auxk for the TopK family, none otherwise.",
                                     choices=("auto", "auxk", "ghost_grads", "resample", "none"))
    resample_every_tokens: int = option(250_000, "resample: re-initialise the latents dead at each multiple "
                                        "of this many training tokens (until the learning-rate decay starts).")
    resample_sample_tokens: int = option(65_536, "resample: training inputs scored for reconstruction loss at "
                                         "each resampling (drawn from the stream); each dead latent takes one, "
                                         "picked with probability proportional to its squared loss.")
    b_dec_init: str = option("median", "Initial decoder bias: geometric median or mean of a sample, or zeros.",
                             choices=("median", "mean", "zeros"))
    normalize_activations: bool = option(True, "Scale inputs to mean norm sqrt(d_in) while training; the "
                                         "scale is folded into the saved weights.")
    # --- optimisation -----------------------------------------------------------------------------
    tokens: int = option(1_200_000, "Training tokens (samples); a small corpus is repeated in epochs.")
    batch_size: int = option(1024, "Activation vectors per optimiser step.")
    lr: float = option(1e-3, "Adam learning rate after warm-up.")
    lr_warmup_fraction: float = option(0.02, "Fraction of steps with a linear learning-rate warm-up.")
    lr_decay_fraction: float = option(0.2, "Final fraction of steps over which the rate decays linearly to 0.")
    grad_clip: float = option(1.0, "Clip the gradient norm to this (0: no clipping).")
    buffer_tokens: int = option(524_288, "Activations held and shuffled at once; memory = buffer_tokens * "
                                "d_in * 4 bytes. A corpus that fits is computed once and reused each epoch.")
    seed: int = option(0, "Random seed: the same seed and config give the same SAE.")
    device: str | None = option(None, "cpu, cuda, cuda:1 ... (default: cuda when available; under torchrun "
                                "each process takes GPU LOCAL_RANK).")
    distribute: str = option("batch", "Under torchrun (`torchrun --nproc_per_node N -m saelab train ...`): "
                             "batch = every process trains every SAE on its 1/N share of each batch (data "
                             "parallel, the same SAEs as one process); saes = with several SAEs (a --hook list), "
                             "each process trains its share of them (round-robin) on whole batches, running the "
                             "model only to its own deepest hook.", choices=("batch", "saes"))
    # --- output -----------------------------------------------------------------------------------
    out: str = option("runs/demo", "Run folder: checkpoint, metrics.jsonl, training_curves.png, final/ SAE.")
    checkpoint_every_tokens: int = option(300_000, "Write a resumable checkpoint this often (and on Ctrl-C).")
    log_every: int = option(25, "Steps between metrics.jsonl lines.")
    eval_dataset: str | None = option(None, "Held-out text for the final evaluation (default: the first "
                                      "eval_tokens of --dataset, which training then skips).")
    eval_tokens: int = option(8192, "Tokens of held-out text for the final evaluation (0: skip it).")
    progress: bool = option(True, "Show progress bars.")
    # --- experiment tracking ----------------------------------------------------------------------
    wandb: bool = option(False, "Log to Weights & Biases as well: every metrics.jsonl record, a histogram of "
                         "log10 firing frequencies each dead window, the final evaluation and the final SAE "
                         "as a model artifact (pip install 'saelab[wandb]'; WANDB_MODE=offline logs to local "
                         "files; --resume continues the same W&B run).")
    wandb_project: str = option("saelab", "W&B project to log to.")
    wandb_entity: str | None = option(None, "W&B entity (user or team) to log to (default: your default entity).")
    wandb_run_name: str | None = option(None, "W&B run name (default: the name of the --out folder).")

    def __post_init__(self):
        if self.architecture == "matryoshka":
            self.architecture = "matryoshka_batchtopk"
        problems = []
        for name in ("context_size", "lm_batch_size", "expansion", "k", "tokens", "batch_size", "buffer_tokens",
                     "checkpoint_every_tokens", "log_every", "dead_window_tokens", "resample_every_tokens",
                     "resample_sample_tokens"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive (got {getattr(self, name)})")
        for f in fields(self):
            allowed = f.metadata.get("choices")
            if allowed and getattr(self, f.name) not in allowed:
                problems.append(f"{f.name} must be one of {', '.join(allowed)} (got {getattr(self, f.name)!r})")
        if self.lr <= 0:
            problems.append(f"lr must be positive (got {self.lr})")
        for name in ("jumprelu_bandwidth", "jumprelu_init_threshold"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be positive (got {getattr(self, name)})")
        if self.l0_coefficient < 0:
            problems.append(f"l0_coefficient must not be negative (got {self.l0_coefficient})")
        if self.target_l0 is not None and not self.target_l0 > 0:
            problems.append(f"target_l0 must be positive (got {self.target_l0})")
        if not 0 < self.threshold_ema_rate <= 1:
            problems.append(f"threshold_ema_rate must be in (0, 1] (got {self.threshold_ema_rate})")
        if self.matryoshka_widths is not None:
            from saelab.sae.matryoshka import parse_widths

            try:
                parse_widths(self.matryoshka_widths)
            except ValueError as err:
                problems.append(str(err))
        remedy = self.dead_latent_remedy
        if remedy == "auxk" and self.architecture not in TOPK_FAMILY:
            problems.append(f"dead_latent_remedy auxk needs a TopK-family architecture ({', '.join(TOPK_FAMILY)}), "
                            f"not {self.architecture}")
        if remedy == "ghost_grads" and self.architecture != "standard":
            problems.append(f"dead_latent_remedy ghost_grads is for the standard architecture, not "
                            f"{self.architecture}")
        if self.buffer_tokens < self.batch_size:
            problems.append(f"buffer_tokens ({self.buffer_tokens}) must be at least batch_size ({self.batch_size})")
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))

    @property
    def block_tokens(self) -> int:
        """Rows the activation buffer fills at once: ``buffer_tokens``, but no more than the run trains on
        (whole batches), so that a short run does not pay the model's forward pass over a full buffer."""
        return min(self.buffer_tokens, -(-self.tokens // self.batch_size) * self.batch_size)

    @property
    def remedy(self) -> str:
        """The dead-latent remedy in effect: ``dead_latent_remedy`` with auto resolved."""
        if self.dead_latent_remedy == "auto":
            return "auxk" if self.architecture in TOPK_FAMILY else "none"
        return self.dead_latent_remedy
