"""The training configuration. Each field's help text is its ``saelab train --help`` entry, and its roles
(``saelab.options``) say how runs, caches and resumes treat it.

The settings of one architecture (``k``, ``l1_coefficient``, ``target_l0``, ...) are declared by that
architecture (``saelab.sae``, its settings dataclass). A TrainConfig takes them by name like its own fields,
``TrainConfig(architecture="jumprelu", target_l0=32)``, keeps those given in ``sae_settings`` and hands the
architecture's typed settings out as ``cfg.settings``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, fields, replace
from itertools import product
from pathlib import Path

from saelab.data.options import DataOptions
from saelab.options import check_fields, fields_with, option
from saelab.sae import DEFAULT_ARCHITECTURE, Architecture, Settings, all_architectures, architecture, settings_fields
from saelab.models.hooks import HOOK_LIST_SEPARATOR, split_hook_list
from saelab.sae.config import KINDS, Kind

# Where each kind of dictionary reads by default (--hook not given), and what a transcoder predicts from a hook
# it may read (--hook-out not given): the MLP's output of the same block.
DEFAULT_HOOK = {"sae": "blocks.6.hook_resid_post", "transcoder": "blocks.6.ln2.hook_normalized",
                "skip_transcoder": "blocks.6.ln2.hook_normalized",
                "crosscoder": "blocks.3.hook_resid_post+blocks.6.hook_resid_post+blocks.9.hook_resid_post",
                "clt": "+".join(f"blocks.{block}.ln2.hook_normalized" for block in range(6))}
MLP_INPUT_KINDS = ("ln2.hook_normalized", "hook_mlp_in", "hook_resid_mid")
_MLP_INPUT = re.compile(r"^blocks\.(\d+)\.(" + "|".join(re.escape(k) for k in MLP_INPUT_KINDS) + ")$")


# Adam's rate at batch 4096, measured on SmolLM2-135M (block 6, 8x and 32x, 50-240 steps): held-out FVU at 1e-3 /
# 3e-3: TopK SAE 0.144 / 0.110 (0.093 / 0.078 over 200 steps), BatchTopK 0.307 / 0.162, JumpReLU (target L0 32)
# 0.192 / 0.123, TopK transcoder 0.567 / 0.497 (0.454 / 0.401 over 240 steps); 32x TopK 1e-3 / 2e-3 / 4e-3:
# 0.126 / 0.106 / 0.099. Other batch sizes take sqrt(batch / 4096) of it (the square-root rule for Adam).
LR_AT_BATCH_4096 = 3e-3


def default_lr(batch_size: int) -> float:
    return LR_AT_BATCH_4096 * (batch_size / 4096) ** 0.5


def _architecture_help() -> str:
    return "SAE architecture: " + "; ".join(
        f"{arch.name}{' (alias ' + ', '.join(arch.aliases) + ')' if arch.aliases else ''}: {arch.summary}"
        for arch in all_architectures()) + "."


@dataclass(init=False)
class TrainConfig(DataOptions):
    """What one training run does. The model, text and data-source fields come from ``DataOptions``; the
    architecture's own settings are given by name too (see the module docstring) and read as ``cfg.k`` or,
    typed, ``cfg.settings.k``."""

    # --- what to read -----------------------------------------------------------------------------
    kind: str = option("sae", lambda: "What the dictionary reads and writes: " + "; ".join(
                       f"{k.name}: {k.summary}" for k in KINDS.values()) + ". Every architecture with an encoder "
                       "(all but matching_pursuit) works as each.", choices=tuple(KINDS), fixed_on_resume=True)
    hook: str | None = option(None, "Hook point read: a TransformerLens-style name (blocks.L.hook_resid_pre|"
                              "resid_mid|resid_post|attn_out|mlp_out, and around the MLP blocks.L.hook_mlp_in|"
                              "ln2.hook_normalized|mlp.hook_post) or a module path (model.layers.6.mlp = that "
                              "module's output); a crosscoder's hooks joined by + (a comma list given with --kind "
                              "crosscoder is one crosscoder over them). Default: blocks.6.hook_resid_post for an SAE, "
                              "blocks.6.ln2.hook_normalized (the MLP's input) for a transcoder, the residual stream "
                              "after blocks 3, 6 and 9 for a crosscoder.", per_sae=True)
    hook_out: str | None = option(None, "Transcoders: the hook point predicted (default: blocks.L.hook_mlp_out of "
                                  "the block whose MLP input --hook reads; a CLT: those of each of its blocks, or "
                                  "as many hooks joined by +).", per_sae=True)
    # --- the SAE ----------------------------------------------------------------------------------
    architecture: str = option(DEFAULT_ARCHITECTURE, _architecture_help, per_sae=True, fixed_on_resume=True)
    expansion: int = option(8, "Latents per input dimension (d_sae = expansion * d_in).", positive=True,
                            per_sae=True, fixed_on_resume=True, label="x{}")
    d_sae: int | None = option(None, "Number of latents; overrides --expansion.", positive=True, per_sae=True,
                               fixed_on_resume=True, label="d{}")
    sae_settings: dict = option(dict, "The architecture's own settings given by name (k, l1_coefficient, "
                                "target_l0, ...: every architecture declares its own; see cfg.settings).")
    l1_warmup_fraction: float = option(0.05, "Fraction of training over which the sparsity penalty's weight "
                                       "(L1 of standard and gated, L0 of jumprelu) ramps up from 0.")
    dead_window_tokens: int = option(200_000, "A latent silent for this many training tokens counts as dead.",
                                     positive=True)
    dead_latent_remedy: str = option("auto", "What revives dead latents: auxk (the TopK family: the AuxK loss, "
                                     "weight --aux-coefficient), ghost_grads (standard: dead latents' "
                                     "exp(pre-activation) reconstruct the residual, an extra loss as large as the "
                                     "reconstruction loss, Anthropic Jan 2024), resample (any architecture: every "
                                     "--resample-every-tokens, dead latents are re-initialised toward badly "
                                     "reconstructed inputs, Towards Monosemanticity), none; auto = each "
                                     "architecture's own default (auxk for the TopK family, none otherwise).",
                                     choices=("auto", "auxk", "ghost_grads", "resample", "none"),
                                     fixed_on_resume=True)
    resample_every_tokens: int = option(250_000, "resample: re-initialise the latents dead at each multiple "
                                        "of this many training tokens (until the learning-rate decay starts).",
                                        positive=True, shared=True)
    resample_sample_tokens: int = option(65_536, "resample: training inputs scored for reconstruction loss at "
                                         "each resampling (drawn from the stream); each dead latent takes one, "
                                         "picked with probability proportional to its squared loss.",
                                         positive=True, shared=True)
    b_dec_init: str = option("median", "Initial decoder bias: geometric median or mean of a sample, or zeros.",
                             choices=("median", "mean", "zeros"))
    fit_init: bool = option(True, "Fit the starting SAE to a sample of the activations: JumpReLU's thresholds "
                            "where each latent fires on target_l0 / d_sae of it (32 / d_sae without a target), then "
                            "the encoder scaled by the least-squares factor between the sample and its "
                            "reconstruction, so the first steps have FVU below 1 (and JumpReLU L0 near its target) "
                            "at any width. --no-fit-init: the plain start (random directions, fixed thresholds).")
    normalize_activations: bool = option(True, "Scale inputs to mean norm sqrt(d_in) while training; the "
                                         "scale is folded into the saved weights.")
    # --- optimisation -----------------------------------------------------------------------------
    tokens: int = option(1_200_000, "Training tokens (samples); a small corpus is repeated in epochs.",
                         positive=True, shared=True, fixed_on_resume=True)
    batch_size: int = option(1024, "Activation vectors per optimiser step.", positive=True, shared=True,
                             fixed_on_resume=True)
    lr: float | None = option(None, "Adam learning rate after warm-up (default: 3e-3 at batch 4096, scaled by "
                              "sqrt(batch_size / 4096), Adam's square-root rule: 1.5e-3 at the default batch).",
                              positive=True, per_sae=True, label="lr{:g}")
    lr_warmup_fraction: float = option(0.02, "Fraction of steps with a linear learning-rate warm-up.")
    lr_decay_fraction: float = option(0.2, "Final fraction of steps over which the rate decays linearly to 0.",
                                      shared=True)
    grad_clip: float = option(1.0, "Clip the gradient norm to this (0: no clipping).")
    compile: bool = option(False, "Compile the dictionary's training forward pass with torch.compile (inductor; "
                           "needs a C++ compiler on CPU, Triton on CUDA). The first steps pay the compilation "
                           "(5-35 s); the result is the same to float rounding. Measured on CPU: JumpReLU 1.3-1.4x "
                           "faster, TopK and BatchTopK within noise (their sparse kernels are not compiled), so off "
                           "by default (README, Benchmarks).")
    autocast: bool = option(False, "Run the dictionary's training forward pass under bfloat16 autocast (its "
                            "matrix products in bf16, weights, optimiser and losses in fp32): for GPUs with bf16 "
                            "tensor cores; on CPU bf16 products are far slower than fp32.")
    buffer_tokens: int = option(524_288, "Activations held and shuffled at once; memory = buffer_tokens * "
                                "d_in * 4 bytes. A corpus that fits is computed once and reused each epoch.",
                                positive=True, shared=True, fixed_on_resume=True)
    seed: int = option(0, "Random seed: the same seed and config give the same SAE.", shared=True,
                       fixed_on_resume=True)
    distribute: str = option("batch", "Under torchrun (`torchrun --nproc_per_node N -m saelab train ...`): "
                             "batch = every process trains every SAE on its 1/N share of each batch (data "
                             "parallel, the same SAEs as one process); saes = with several SAEs (a --hook list), "
                             "each process trains its share of them (round-robin) on whole batches, running the "
                             "model only to its own deepest hook.", choices=("batch", "saes"), shared=True)
    # --- output -----------------------------------------------------------------------------------
    out: str = option("runs/demo", "Run folder: checkpoint, metrics.jsonl, training_curves.png, final/ SAE.")
    checkpoint_every_tokens: int = option(300_000, "Write a resumable checkpoint this often (and on Ctrl-C).",
                                          positive=True)
    log_every: int = option(25, "Steps between metrics.jsonl lines.", positive=True)
    progress: bool = option(True, "Show progress bars.", shared=True)
    # --- experiment tracking ----------------------------------------------------------------------
    wandb: bool = option(False, "Log to Weights & Biases as well: every metrics.jsonl record, a histogram of "
                         "log10 firing frequencies each dead window, the final evaluation and the final SAE "
                         "as a model artifact (pip install 'saelab[wandb]'; WANDB_MODE=offline logs to local "
                         "files; --resume continues the same W&B run).")
    wandb_project: str = option("saelab", "W&B project to log to.")
    wandb_entity: str | None = option(None, "W&B entity (user or team) to log to (default: your default entity).")
    wandb_run_name: str | None = option(None, "W&B run name (default: the name of the --out folder).")

    def __init__(self, **values):
        """Fields by name; any registered architecture's settings by name too (they go to ``sae_settings``)."""
        own = {f.name for f in fields(TrainConfig)}
        known_settings = settings_fields()
        unknown = sorted(set(values) - own - set(known_settings))
        if unknown:
            raise TypeError(f"TrainConfig got unknown field(s) {', '.join(unknown)}")
        settings = dict(values.pop("sae_settings", None) or {})
        settings.update({name: values.pop(name) for name in list(values) if name in known_settings})
        for f in fields(TrainConfig):
            if f.name == "sae_settings":
                setattr(self, f.name, settings)
            elif f.name in values:
                setattr(self, f.name, values[f.name])
            else:
                setattr(self, f.name, f.default_factory() if f.default is dataclasses.MISSING else f.default)
        self.__post_init__()

    def __post_init__(self):
        problems = check_fields(self)
        if self.lr is None:
            self.lr = default_lr(self.batch_size)
        if self.kind in KINDS:
            if self.hook is None:
                self.hook = DEFAULT_HOOK[self.kind]
            problems += self._hook_out_problems()
        try:
            self.architecture = architecture(self.architecture).name  # aliases -> the name
        except ValueError as err:
            problems.append(str(err))
        else:
            arch = architecture(self.architecture)
            if getattr(arch.module, "tied_encoder", False) and self.kind != "sae":
                problems.append(f"{arch.name} reads its input with its own decoder rows, so it cannot be a "
                                f"{self.kind}; choose another architecture or --kind sae")
            if not arch.accepts_remedy(self.dead_latent_remedy):
                takes = [a.name for a in all_architectures() if self.dead_latent_remedy in a.remedies]
                problems.append(f"dead_latent_remedy {self.dead_latent_remedy} is for the {', '.join(takes)} "
                                f"architecture{'s' if len(takes) > 1 else ''}, not {self.architecture}")
        problems += _settings_problems(self.sae_settings)
        if self.buffer_tokens < self.batch_size:
            problems.append(f"buffer_tokens ({self.buffer_tokens}) must be at least batch_size ({self.batch_size})")
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))

    def __getattr__(self, name: str):
        # cfg.k, cfg.target_l0, ...: a setting as given, else this architecture's default (else the default of
        # the architecture that declares it).
        if name == "sae_settings" or name not in settings_fields():
            raise AttributeError(f"'TrainConfig' object has no attribute {name!r}")
        given = self.__dict__.get("sae_settings", {})
        return given[name] if name in given else getattr(self.settings, name, settings_fields()[name][0].default)

    def as_dict(self) -> dict:
        """Every field, with this architecture's settings resolved (defaults included): what a run records in
        its checkpoint, runner_cfg.json and W&B config. ``TrainConfig(**cfg.as_dict())`` is the same run."""
        values = dataclasses.asdict(self)
        values["sae_settings"] = {**dataclasses.asdict(self.settings), **self.sae_settings}
        return values

    def _hook_out_problems(self) -> list[str]:
        """What is wrong with the pair of hooks (a transcoder's default output hook is derived, not stored, so that a
        config copied with another --hook predicts that block's MLP output)."""
        reads = split_hook_list(self.hook)
        if KINDS[self.kind].multi_hook and len(reads) < 2:
            return [f"a {self.kind} reads several hook points joined by {HOOK_LIST_SEPARATOR} (e.g. "
                    f"{DEFAULT_HOOK[self.kind]}), not only {self.hook}"]
        if not KINDS[self.kind].multi_hook and len(reads) > 1:
            return [f"a {self.kind} reads one hook point, not {self.hook}: pass --kind crosscoder (or clt) to read "
                    "several"]
        outputs = len(reads) if KINDS[self.kind].cross_layer else 1
        if self.hook_out is not None and len(split_hook_list(self.hook_out)) != outputs:
            return [f"--hook-out must name one output hook per hook read ({outputs}), got {self.hook_out}"]
        if not KINDS[self.kind].separate_output:
            return [f"hook_out is for transcoders; a {self.kind} reconstructs its --hook ({self.hook}); drop "
                    "--hook-out or pass --kind transcoder"] if self.hook_out is not None else []
        unmatched = [hook for hook in reads if _MLP_INPUT.match(hook) is None]
        if self.hook_out is None and unmatched:
            return [f"a {self.kind} needs --hook-out, the hook point it predicts: it is the MLP output of the "
                    f"block only when --hook is an MLP input (blocks.L.{', blocks.L.'.join(MLP_INPUT_KINDS)}), "
                    f"not {unmatched[0]}"]
        if set(split_hook_list(self.target_hook)) & set(reads):
            return [f"a {self.kind} predicts another hook point than it reads (both are {self.hook}); train an SAE "
                    "(--kind sae) to reconstruct one"]
        return []

    @property
    def target_hook(self) -> str | None:
        """The hook a transcoder predicts: ``hook_out``, else the MLP output of the block whose MLP input ``hook``
        reads; None for an SAE."""
        if not KINDS[self.kind].separate_output:
            return None
        if self.hook_out is not None:
            return self.hook_out
        matches = [_MLP_INPUT.match(hook) for hook in split_hook_list(self.hook)]
        if not all(matches):
            return None
        return HOOK_LIST_SEPARATOR.join(f"blocks.{match.group(1)}.hook_mlp_out" for match in matches)

    @property
    def kind_facts(self) -> Kind:
        return KINDS[self.kind]

    @property
    def hooks(self) -> list[str]:
        """The hook points this dictionary reads and predicts (one for an SAE, several for a crosscoder)."""
        return split_hook_list(self.hook) + ([] if self.target_hook is None else split_hook_list(self.target_hook))

    @property
    def arch(self) -> Architecture:
        return architecture(self.architecture)

    @property
    def settings(self) -> Settings:
        """This architecture's training settings: the values given for it, its defaults for the rest."""
        return self.arch.settings_from(self.sae_settings)

    @property
    def block_tokens(self) -> int:
        """Rows the activation buffer fills at once: ``buffer_tokens``, but no more than the run trains on
        (whole batches), so that a short run does not pay the model's forward pass over a full buffer."""
        return min(self.buffer_tokens, -(-self.tokens // self.batch_size) * self.batch_size)

    @property
    def remedy(self) -> str:
        """The dead-latent remedy in effect: ``dead_latent_remedy`` with auto resolved by the architecture."""
        return self.arch.resolve_remedy(self.dead_latent_remedy)

    @property
    def sparsity_value(self):
        """The value of the setting that sets this architecture's sparsity (None when it has none)."""
        return getattr(self.settings, self.arch.sparsity) if self.arch.sparsity else None


def _settings_problems(given: dict) -> list[str]:
    """Each given setting checked by every architecture that declares it (a value need not suit the
    architecture chosen now: a sweep or a comma list may apply it to another)."""
    problems = []
    for arch in all_architectures():
        own = {f.name for f in dataclasses.fields(arch.settings)}
        values = {name: value for name, value in given.items() if name in own}
        if not values:
            continue
        try:
            arch.settings(**values)
        except ValueError as err:
            if str(err) not in problems:
                problems.append(str(err))
    return problems


# --- the configs of a run: several dictionaries trained together ----------------------------------------
def check_shared(configs: list[TrainConfig]) -> None:
    """Dictionaries trained together must agree on the data and the step schedule (the fields declared
    ``shared``); name the first difference."""
    if not configs:
        raise ValueError("no SAE to train")
    first = configs[0]
    for cfg in configs[1:]:
        for name in fields_with(TrainConfig, "shared"):
            if getattr(cfg, name) != getattr(first, name):
                raise ValueError(f"SAEs trained together must share {name} (got {getattr(first, name)!r} and "
                                 f"{getattr(cfg, name)!r}); they read one stream of batches. Train them in "
                                 "separate runs instead.")
    if len({cfg.remedy == "resample" for cfg in configs}) > 1:  # resampling draws extra batches from the stream
        raise ValueError("SAEs trained together must all resample dead latents or none (dead_latent_remedy "
                         "resample); they read one stream of batches. Train them in separate runs instead.")
    folders = [str(Path(cfg.out).resolve()) for cfg in configs]
    if len(set(folders)) < len(folders):
        raise ValueError("SAEs trained together need a run folder (out) each")


def list_fields() -> tuple[str, ...]:
    """The fields (TrainConfig's and the architectures' settings) that may take several values in one run."""
    return (*fields_with(TrainConfig, "per_sae"),
            *(name for name, (f, _) in settings_fields().items() if f.metadata.get("per_sae")))


def expand(base: TrainConfig, lists: dict[str, list]) -> list[TrainConfig]:
    """One config per combination of the listed values, each with its run folder under ``base.out``, named
    ``<hook>-<architecture>-<sparsity>`` (plus any other field that varies), e.g.
    ``blocks.6.hook_resid_post-topk-k32``."""
    unknown = set(lists) - set(list_fields())
    if unknown:
        raise ValueError(f"{', '.join(sorted(unknown))} cannot take several values (those that can: "
                         f"{', '.join(list_fields())})")
    names = list(lists)
    configs = []
    for values in product(*(lists[name] for name in names)):
        cfg = replace(base, **dict(zip(names, values)))
        varied = [name for name in fields_with(TrainConfig, "label") if len(lists.get(name, ())) > 1]
        configs.append(replace(cfg, out=str(Path(base.out) / run_name(cfg, varied))))
    folders = [cfg.out for cfg in configs]
    if len(set(folders)) < len(folders):
        raise ValueError("the listed values repeat a combination: " + ", ".join(sorted(
            {Path(f).name for f in folders if folders.count(f) > 1})))
    return configs


def layer_hooks(layers: str, hook: str) -> list[str]:
    """``hook`` (a ``blocks.L.*`` name) at each block of ``layers``: ``0-11``, ``0,3,6`` or a mix (``0-2,6``)."""
    match = re.match(r"^blocks\.\d+\.(.+)$", hook)
    if match is None:
        raise ValueError(f"--layers puts a TransformerLens-style hook (blocks.L.<kind>) at each block, not {hook!r}: "
                         "give --hook as such a name, or list module paths in --hook")
    blocks: list[int] = []
    for part in (p.strip() for p in str(layers).split(",") if p.strip()):
        first, _, last = part.partition("-")
        try:
            blocks += list(range(int(first), int(last or first) + 1))
        except ValueError:
            raise ValueError(f"--layers must be block numbers and ranges like 0-11 or 0,3,6, got {layers!r}") from None
    if not blocks or len(set(blocks)) < len(blocks) or min(blocks) < 0:
        raise ValueError(f"--layers must name distinct blocks >= 0, got {layers!r}")
    return [f"blocks.{block}.{match.group(1)}" for block in blocks]


def sparsity_label(cfg: TrainConfig) -> str:
    """``topk-k32``, ``jumprelu-target_l0_32``, ``standard-l1_5``: the architecture and its sparsity setting."""
    value = cfg.sparsity_value
    return cfg.architecture if value is None else f"{cfg.architecture}-{cfg.arch.label}{format_value(value)}"


def run_name(cfg: TrainConfig, varied=()) -> str:
    """``<hook>-<architecture>-<sparsity>``, then each field in ``varied`` by its declared label."""
    labels = {f.name: f.metadata["label"] for f in fields(TrainConfig)}
    return "-".join([cfg.hook.replace("/", "_"), sparsity_label(cfg),
                     *(labels[name].format(getattr(cfg, name)) for name in varied)])


def format_value(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
