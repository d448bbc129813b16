"""Where a training run's activations come from: a language model run over text, or an activation cache
written by ``saelab cache``; and the held-out part its dictionaries are evaluated on. Every command that
trains builds its data here (``TrainingData``), so a run on the model and a run on a cache of the same text
see the same rows in the same order.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
from tqdm.auto import tqdm

from saelab.data.activations import NormFilter, TensorSource, text_activations
from saelab.data.cache import ActivationCache
from saelab.data.options import DataOptions
from saelab.data.synthetic import SyntheticConfig, SyntheticFeatures, SyntheticSource
from saelab.data.text import describe_source
from saelab.models import HookPoint, load_model, resolve_hook
from saelab.models.hooks import HOOK_LIST_SEPARATOR, split_hook_list
from saelab.options import fields_with
from saelab.version import __version__


def held_out_contexts(cfg: DataOptions) -> int:
    return math.ceil(cfg.eval_tokens / cfg.context_size) if cfg.eval_tokens > 0 else 0


def sae_metadata(cfg: DataOptions, hook: str, module_path: str, dataset_path: str | None = None) -> dict:
    """What a dictionary trained on this data records about it (SAELens metadata keys)."""
    return {"model_name": cfg.model, "hook_name": hook, "hook_module_path": module_path,
            "context_size": cfg.context_size, "prepend_bos": cfg.prepend_bos,
            "dataset_path": dataset_path or describe_source(cfg.dataset),
            "exclude_special_tokens": cfg.exclude_special_tokens, "sequence_separator_token": "bos",
            "sae_lens_training_version": None, "saelab_version": __version__,
            **({"max_activation_norm_multiple": cfg.max_activation_norm_multiple}
               if cfg.max_activation_norm_multiple else {})}


@dataclass
class HeldOut:
    """A run's held-out data: token batches with the model that reads them (CE/KL possible), or the last
    contexts of a cache (reconstruction metrics only). ``saelab.evals.evaluate_held_out`` evaluates on it."""

    description: str                                 # what eval.json records as eval_dataset
    tokens: int                                      # tokens it holds (for messages)
    model: torch.nn.Module | None = None
    hooks: dict[str, HookPoint] = field(default_factory=dict)
    token_batches: list[torch.Tensor] = field(default_factory=list)
    keep_mask: Callable | None = None
    cache: ActivationCache | None = None
    cache_start: int = 0                             # the first held-out context of the cache
    synthetic: SyntheticFeatures | None = None       # synthetic data: scored against its true features


class TrainingData:
    """The activations a run's dictionaries train on: every hook in ``hooks`` side by side in one source
    (``columns[hook]`` is each one's slice), from one forward pass per batch or from the cache; ``cfg`` is the
    data config with what a cache fixes taken from it."""

    def __init__(self, cfg: DataOptions, hooks: Sequence[str], model_and_tokenizer=None):
        self.hook_names = list(dict.fromkeys(hooks))
        self._held_out: HeldOut | None = None
        self.synthetic = None
        if cfg.activations is not None and cfg.synthetic is not None:
            raise ValueError("--activations and --synthetic both name the training data; give one")
        if cfg.activations is not None:
            self._open_cache(cfg)
        elif cfg.synthetic is not None:
            self._open_synthetic(cfg)
        else:
            self.cache = None
            self.cfg = cfg
            self.model, self.tokenizer = model_and_tokenizer or load_model(cfg.model, cfg.device)
            self.hooks = {name: resolve_hook(self.model, name) for name in self.hook_names}
            skip = held_out_contexts(cfg) if cfg.eval_dataset is None else 0  # held out from the training stream
            self.source = text_activations(self.model, self.tokenizer, list(self.hooks.values()), cfg,
                                           skip_contexts=skip)
            self.columns = self.source.columns
            self.module_paths = {name: hook.module_path for name, hook in self.hooks.items()}
            self.dataset_path = None
        if cfg.max_activation_norm_multiple:
            self.source = NormFilter(self.source, cfg.max_activation_norm_multiple)

    def _open_cache(self, cfg: DataOptions) -> None:
        self.cache = cache = ActivationCache(cfg.activations)
        self.cfg = cfg = cache.configure(cfg, self.hook_names)
        held_out = held_out_contexts(cfg) if cfg.eval_dataset is None else 0
        self.eval_start = cache.n_contexts - held_out
        if self.eval_start <= 0:
            raise ValueError(f"activation cache {cfg.activations} holds {cache.n_contexts} contexts; holding out "
                             f"--eval-tokens {cfg.eval_tokens} would leave none to train on. Lower --eval-tokens, "
                             "pass --eval-dataset, or cache more tokens.")
        self.model = self.tokenizer = None
        self.source = cache.source(self.hook_names, stop=self.eval_start)
        self.columns = self.source.columns
        self.module_paths = {name: cache.hook_info(name)["module_path"] for name in self.hook_names}
        self.dataset_path = cache.metadata["dataset_path"]

    def _open_synthetic(self, cfg: DataOptions) -> None:
        """Synthetic activations (data/synthetic.py): every hook name reads the same samples."""
        self.cfg, self.cache, self.model, self.tokenizer = cfg, None, None, None
        self.synthetic = SyntheticFeatures(SyntheticConfig.load(cfg.synthetic))
        rows = self.synthetic.cfg.rows_per_unit
        tokens = getattr(cfg, "tokens", rows)
        self.source = SyntheticSource(self.synthetic, units=max(1, math.ceil(tokens / rows)))
        self.columns = {name: slice(0, self.source.d_in) for name in self.hook_names}
        self.module_paths = {name: "synthetic" for name in self.hook_names}
        self.dataset_path = cfg.synthetic

    @property
    def described(self) -> str:
        if self.synthetic is not None:
            s = self.synthetic.cfg
            return f"synthetic activations ({s.n_features:,} features in {s.d_in} dimensions, {self.cfg.synthetic})"
        if self.cache is not None:
            return f"activations of {self.cfg.model} cached in {self.cfg.activations} (no model loaded)"
        return f"{self.cfg.model} over {self.cfg.dataset}"

    def fixed(self, cfg):
        """``cfg`` (a config of a run on this data) with what the data fixes taken from it: a cache's model,
        text and packing (the fields declared ``cached``); on the model, ``cfg`` as it is."""
        return replace(cfg, **{name: getattr(self.cfg, name) for name in fields_with(type(cfg), "cached")})

    def metadata(self, hooks: str | list[str], hook_out: str | None = None) -> dict:
        """What a dictionary reading ``hooks`` (one; a crosscoder: several) and predicting ``hook_out`` (a
        transcoder) records about its data. Several hooks: ``hook_names`` lists them, ``hook_name`` joins them."""
        hooks = [hooks] if isinstance(hooks, str) else list(hooks)
        hook = HOOK_LIST_SEPARATOR.join(hooks)
        outs = [] if hook_out is None else split_hook_list(hook_out)
        out = {} if hook_out is None else {"hook_name_out": hook_out, "hook_head_index_out": None,
                                           "hook_module_path_out": HOOK_LIST_SEPARATOR.join(
                                               self.module_paths[name] for name in outs)}
        if len(hooks) > 1:
            out.update(hook_names=hooks, hook_module_paths=[self.module_paths[name] for name in hooks])
        if len(outs) > 1:
            out.update(hook_names_out=outs)
        if self.synthetic is not None:
            return {"model_name": "synthetic", "hook_name": hook, "dataset_path": self.dataset_path,
                    "synthetic_config": asdict(self.synthetic.cfg), "saelab_version": __version__, **out}
        return {**sae_metadata(self.cfg, hook, self.module_paths[hooks[0]], self.dataset_path), **out}

    def keep_in_memory(self, max_rows: int, progress: bool = False) -> tuple[int, float]:
        """Read the first ``max_rows`` rows of the source once (one pass of the model) and train on them from
        memory from now on, in epochs; returns (rows, seconds). A cache is left as it is (it is on disk)."""
        t0 = time.perf_counter()
        if self.cache is not None:
            return self.source.rows(), 0.0
        chunks, rows = [], 0
        bar = tqdm(total=max_rows, desc="collecting activations", unit="tok", unit_scale=True, disable=not progress)
        units = self.source.units(0)
        try:
            for chunk in units:
                chunks.append(chunk[:max_rows - rows])
                rows += len(chunks[-1])
                bar.update(len(chunks[-1]))
                if rows >= max_rows:
                    break
        finally:
            units.close()
            bar.close()
        if not chunks:
            raise ValueError("the training text gave no activations (check the dataset path, split and text column)")
        self.source = TensorSource(torch.cat(chunks), columns=self.columns)
        return rows, time.perf_counter() - t0

    def language_model(self):
        """``(model, tokenizer, {hook name: HookPoint})``, the model loaded now if the data came from a cache;
        synthetic data has none (ValueError)."""
        if self.synthetic is not None:
            raise ValueError("synthetic activations come from no language model: the suites that run prompts "
                             "through one (absorption, probing) need text or a cache of a model's activations")
        if self.model is None:
            self.model, self.tokenizer = load_model(self.cfg.model, self.cfg.device)
            self.hooks = {name: resolve_hook(self.model, name) for name in self.hook_names}
        return self.model, self.tokenizer, self.hooks

    def held_out(self) -> HeldOut | None:
        """The held-out data (built on first use; loads the model when a cache run names --eval-dataset);
        None when the run evaluates nothing (eval_tokens 0)."""
        cfg = self.cfg
        if cfg.eval_tokens <= 0:
            return None
        if self._held_out is None:
            if self.synthetic is not None:
                self._held_out = HeldOut(f"{cfg.synthetic} (evaluation samples, never trained on)", cfg.eval_tokens,
                                         synthetic=self.synthetic)
            elif self.cache is not None and cfg.eval_dataset is None:
                contexts = self.cache.n_contexts - self.eval_start
                self._held_out = HeldOut(f"{cfg.activations} (last {contexts} contexts, held out)",
                                         contexts * cfg.context_size, cache=self.cache, cache_start=self.eval_start)
            else:
                self.language_model()  # a cache run evaluated on text: the model is loaded for that alone
                dataset = cfg.eval_dataset or cfg.dataset
                reader = text_activations(self.model, self.tokenizer, list(self.hooks.values())[0], cfg, dataset,
                                          max_contexts=held_out_contexts(cfg))
                batches = list(reader.token_batches())
                self._held_out = HeldOut(dataset, sum(b.numel() for b in batches), model=self.model,
                                         hooks=self.hooks, token_batches=batches, keep_mask=reader.keep_mask)
        return self._held_out
