"""Open an SAE folder together with the model and hook point it reads, and check that they fit.

Model, hook and BOS convention come from the SAE's ``cfg.json`` metadata unless given. ``saelab eval``
and the analysis commands all open SAEs this way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

import math

from saelab.data.activations import LMActivationSource, text_activations
from saelab.data.options import TextOptions
from saelab.data.tokens import bos_id, special_ids
from saelab.evals.options import CorpusOptions
from saelab.models import HookPoint, ModelLoadError, capture, hook_widths, load_model, resolve_hook
from saelab.models.hooks import split_hook_list
from saelab.sae import SAE

DEFAULT_CONTEXT_SIZE = 128


def find_sae_folder(path) -> Path:
    """The SAE folder named by ``path``: the folder itself, or ``<run>/final`` for a training run folder."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"SAE folder {folder} does not exist")
    if not folder.is_dir():
        raise ValueError(f"{folder} is a file; pass the SAE folder (holding cfg.json and sae_weights.safetensors)")
    if not (folder / "cfg.json").exists() and (folder / "final" / "cfg.json").exists():
        return folder / "final"  # a run folder from `saelab train`
    return folder


def run_folder(sae_folder) -> Path | None:
    """The run folder of ``saelab train`` whose ``final/`` SAE this is, or None for an SAE folder of its own. What
    is made from an SAE (reports, dashboards, explanations) goes into its run folder, else beside the SAE."""
    folder = Path(sae_folder).resolve()
    return folder.parent if folder.name == "final" else None


@dataclass
class Loaded:
    """An SAE with the model, tokenizer and hook point it belongs to."""

    sae: SAE
    model: torch.nn.Module
    tokenizer: object
    hook: HookPoint
    folder: Path
    model_name: str
    prepend_bos: bool
    hooks: list[HookPoint] | None = None          # a crosscoder's or CLT's hook points (``hook`` is the first)
    output_hooks: list[HookPoint] | None = None   # where a transcoder or CLT writes (None: where it reads)

    @property
    def reads(self) -> list[HookPoint]:
        """The hook points the dictionary reads, in the order of its input's columns."""
        return self.hooks or [self.hook]

    @property
    def written(self) -> list[HookPoint]:
        """The hook points its decoder writes, in the order of its output's columns (``decoder_by_hook``)."""
        return self.output_hooks or self.reads

    @property
    def writes(self) -> HookPoint:
        """The hook point it writes nearest the output: an SAE's own, a transcoder's output hook, the last of a
        crosscoder's or CLT's (what the direct logit effects of its latents go through)."""
        return self.written[-1]

    def input_activations(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[batch, seq, d_in]``: what the dictionary reads for ``tokens``, its hooks' activations side by side."""
        acts = capture(self.model, tokens.to(self.device), self.reads)
        return torch.cat([acts[hook.name] for hook in self.reads], -1).float()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, text: str) -> torch.Tensor:
        """``[1, seq]`` token ids of ``text``, starting with BOS when the SAE was trained that way."""
        return tokenize(self.tokenizer, text, self.prepend_bos).to(self.device)

    def special_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """True at BOS/EOS/pad positions (left out of SAE training by default)."""
        return torch.isin(tokens.cpu(), special_ids(self.tokenizer))


def tokenize(tokenizer, text: str, prepend_bos: bool = True) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if prepend_bos:
        ids = [bos_id(tokenizer), *ids]
    if not ids:
        raise ValueError("the text is empty: give at least one token of text")
    return torch.tensor([ids], dtype=torch.long)


def load_sae_and_model(sae_path, model: str | None = None, hook: str | None = None,
                       device: str | None = None, say=None) -> Loaded:
    """Load the SAE folder (or a run folder holding ``final/``), its model and hook points.

    Raises ValueError (or ModelLoadError) with a readable message when the metadata names no model or
    hook, the model cannot be loaded, or the hook's width is not the SAE's ``d_in``.
    """
    say = say or (lambda message: None)
    folder = find_sae_folder(sae_path)
    sae = SAE.load(folder)
    meta = sae.cfg.metadata
    model_name = model or meta.get("model_name")
    if not model_name:
        raise ValueError(f"{folder}/cfg.json names no model (metadata model_name); pass --model")
    hook_name = hook or meta.get("hook_name")
    if not hook_name:
        raise ValueError(f"{folder}/cfg.json names no hook point (metadata hook_name); pass --hook")
    prepend_bos = bool(meta.get("prepend_bos", True))
    out = f" -> {meta['hook_name_out']}" if sae.cfg.separate_output and meta.get("hook_name_out") else ""
    say(f"loading {model_name} for {folder} ({sae.cfg.describe()}) at {hook_name}{out}")
    try:
        lm, tokenizer = load_model(model_name, device)
    except ModelLoadError as err:
        if model is None:
            raise ModelLoadError(f"{err}\n(the model name {model_name!r} comes from the SAE's cfg.json; pass "
                                 "--model to use another name, folder or file for that model)") from err
        raise
    hooks = [resolve_hook(lm, name) for name in split_hook_list(hook_name)]
    written = sae.cfg.written_hooks
    if sae.cfg.separate_output and len(written) != sae.cfg.n_hooks:
        raise ValueError(f"{folder}/cfg.json names {len(written)} output hook(s) (metadata hook_name_out"
                         f"{', hook_names_out' if sae.cfg.n_hooks > 1 else ''}) for a {sae.cfg.kind} writing "
                         f"{sae.cfg.n_hooks}; add them (e.g. blocks.6.hook_mlp_out)")
    output_hooks = [resolve_hook(lm, name) for name in written] if sae.cfg.separate_output else None
    loaded = Loaded(sae.to(next(lm.parameters()).device).eval(), lm, tokenizer, hooks[0], folder, model_name,
                    prepend_bos, hooks if len(hooks) > 1 else None, output_hooks)
    check_width(loaded)
    return loaded


def check_width(loaded: Loaded) -> None:
    """The hook's activation width must be the SAE's ``d_in`` (each of a crosscoder's hooks: its hook width)."""
    hooks = loaded.hooks or [loaded.hook]
    widths = hook_widths(loaded.model, hooks, bos_id(loaded.tokenizer))
    if len(hooks) != loaded.sae.cfg.n_hooks:
        raise ValueError(f"the SAE reads {loaded.sae.cfg.n_hooks} hook point(s), {len(hooks)} given "
                         f"({', '.join(h.name for h in hooks)}); join a crosscoder's hooks with + in --hook")
    for hook in hooks[1:]:
        if widths[hook.name] != loaded.sae.cfg.hook_width:
            raise ValueError(f"hook {hook.name!r} of {loaded.model_name} has width {widths[hook.name]}, but the "
                             f"crosscoder reads {loaded.sae.cfg.hook_width} at each of its hooks")
    width = widths[loaded.hook.name] * len(hooks)
    if width != loaded.sae.cfg.d_in:
        raise ValueError(f"hook {loaded.hook.name!r} of {loaded.model_name} has width {width}, but the SAE's d_in is "
                         f"{loaded.sae.cfg.d_in}: the SAE reads another hook point (its cfg.json says "
                         f"{loaded.sae.cfg.metadata.get('hook_name')!r}) or another model; pass --hook / --model "
                         f"with a point of width {loaded.sae.cfg.d_in} (`saelab hooks --model ...` lists them)")


def corpus_source(loaded: Loaded, corpus: CorpusOptions, tokens: int, prepend_bos: bool | None = None
                  ) -> LMActivationSource:
    """The first ``tokens`` tokens of ``corpus.dataset`` (rounded up to whole contexts) through the SAE's model
    and hook, packed as the SAE was trained (its metadata context size and BOS convention) unless ``corpus``
    or ``prepend_bos`` say otherwise; special tokens masked unless included."""
    context_size = int(corpus.context_size or loaded.sae.cfg.metadata.get("context_size") or DEFAULT_CONTEXT_SIZE)
    if tokens <= 0 or corpus.batch_contexts <= 0 or context_size <= 1:
        raise ValueError(f"--tokens and --batch-contexts must be positive and --context-size at least 2 (got "
                         f"tokens={tokens}, batch_contexts={corpus.batch_contexts}, context_size={context_size})")
    text = TextOptions(dataset=corpus.dataset, dataset_split=corpus.dataset_split, text_column=corpus.text_column,
                       context_size=context_size, prepend_bos=loaded.prepend_bos if prepend_bos is None else prepend_bos,
                       exclude_special_tokens=not corpus.include_special_tokens, lm_batch_size=corpus.batch_contexts)
    return text_activations(loaded.model, loaded.tokenizer, loaded.hook, text,
                            max_contexts=math.ceil(tokens / context_size))
