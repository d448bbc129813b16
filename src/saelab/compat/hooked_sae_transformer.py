"""``HookedSAETransformer``: a TransformerLens ``HookedTransformer`` that runs with SAEs spliced in.

An attached SAE takes the place of the hook point it was trained on (its metadata ``hook_name``): the
activation there is encoded and decoded, and the reconstruction flows on through the model. Inside the
splice are hook points of its own, so ``run_with_cache`` records them and hooks can edit them::

    blocks.L.hook_resid_pre.hook_sae_input       what the SAE receives
    blocks.L.hook_resid_pre.hook_sae_acts_post   its latents (edit these to intervene)
    blocks.L.hook_resid_pre.hook_sae_recons      its reconstruction
    blocks.L.hook_resid_pre.hook_sae_error       input - clean reconstruction (only with use_error_term)
    blocks.L.hook_resid_pre.hook_sae_output      what flows on

With ``use_error_term=True`` the reconstruction error is added back, so the model computes exactly what
it computes without the SAE unless a hook changes the latents. Needs ``transformer_lens`` (``saelab[tl]``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from saelab.sae import SAE


class SAESplice(nn.Module):
    """Stands in for one hook point: the SAE's reconstruction (plus, optionally, its error) goes on."""

    def __init__(self, sae: SAE, use_error_term: bool = False):
        super().__init__()
        # Kept out of the module tree: the model's state_dict and parameters stay the model's own.
        self.__dict__["sae"] = sae
        self.use_error_term = use_error_term
        self.hook_sae_input = HookPoint()
        self.hook_sae_acts_post = HookPoint()
        self.hook_sae_recons = HookPoint()
        self.hook_sae_error = HookPoint()
        self.hook_sae_output = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sae_in = self.hook_sae_input(x.to(self.sae.W_enc.dtype))
        latents = self.sae.encode(sae_in)
        # The clean reconstruction is taken before any hook on the latents can edit them (even in place).
        clean = self.sae.decode(latents) if self.use_error_term else None
        recons = self.hook_sae_recons(self.sae.decode(self.hook_sae_acts_post(latents)))
        if clean is not None:
            recons = recons + self.hook_sae_error((sae_in - clean).detach())
        return self.hook_sae_output(recons.to(x.dtype))


class HookedSAETransformer(HookedTransformer):
    """A HookedTransformer with ``add_sae``/``reset_saes``, ``run_with_saes`` and ``run_with_cache_with_saes``
    (the SAELens names). Build it as a HookedTransformer: from a config, or ``from_pretrained(name)``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._replaced: dict[str, nn.Module] = {}  # hook name -> the hook point its SAE stands in for

    @property
    def acts_to_saes(self) -> dict[str, SAE]:
        """The attached SAEs by hook name."""
        return {name: self.get_submodule(name).sae for name in self._replaced}

    def add_sae(self, sae: SAE, use_error_term: bool = False, hook_name: str | None = None) -> None:
        """Splice ``sae`` in at ``hook_name`` (default: its metadata ``hook_name``) until ``reset_saes``;
        an SAE already there is replaced."""
        name = hook_name or sae.cfg.metadata.get("hook_name")
        if not name:
            raise ValueError("the SAE's metadata names no hook_name; pass hook_name= (e.g. 'blocks.0.hook_resid_post')")
        if name in self._replaced:
            self._restore(name)
        original = self.hook_dict.get(name)
        if original is None:
            raise ValueError(f"{type(self).__name__} has no hook point {name!r} to attach the SAE to; model.hook_dict "
                             "lists them")
        width = self.cfg.d_model if name.split(".")[-1].startswith("hook_resid") else None
        if width is not None and width != sae.cfg.d_in:
            raise ValueError(f"hook {name!r} has width {width} but the SAE's d_in is {sae.cfg.d_in}: it was trained "
                             "on another model or hook point")
        self._set_module(name, SAESplice(sae, use_error_term))
        self._replaced[name] = original
        self.setup()  # rebuilds hook_dict: the splice's own hook points become cacheable

    def reset_saes(self, hook_names: str | Iterable[str] | None = None) -> None:
        """Detach the SAEs at ``hook_names`` (default: all), putting the original hook points back."""
        names = [hook_names] if isinstance(hook_names, str) else list(hook_names or self._replaced)
        for name in names:
            if name in self._replaced:
                self._restore(name)
        self.setup()

    @contextmanager
    def saes(self, saes: SAE | Iterable[SAE] = (), use_error_term: bool = False) -> Iterator[HookedSAETransformer]:
        """Inside: ``saes`` attached; afterwards the model is as it was (SAEs attached before are kept)."""
        saes = [saes] if isinstance(saes, SAE) else list(saes)
        before = {name: self.get_submodule(name) for name in self._replaced}  # splices attached before
        try:
            for sae in saes:
                self.add_sae(sae, use_error_term=use_error_term)
            yield self
        finally:
            self.reset_saes()
            for name, splice in before.items():
                self._replaced[name] = self.get_submodule(name)  # the hook point reset_saes just put back
                self._set_module(name, splice)
            self.setup()

    def run_with_saes(self, *model_args, saes: SAE | Iterable[SAE] = (), use_error_term: bool = False,
                      **model_kwargs):
        """The forward pass (same arguments as calling the model) with ``saes`` spliced in for this call."""
        with self.saes(saes, use_error_term):
            return self(*model_args, **model_kwargs)

    def run_with_cache_with_saes(self, *model_args, saes: SAE | Iterable[SAE] = (), use_error_term: bool = False,
                                 **model_kwargs):
        """``run_with_cache`` with ``saes`` spliced in: the cache holds ``<hook>.hook_sae_acts_post`` & co."""
        with self.saes(saes, use_error_term):
            return self.run_with_cache(*model_args, **model_kwargs)

    def run_with_hooks_with_saes(self, *model_args, saes: SAE | Iterable[SAE] = (), use_error_term: bool = False,
                                 **model_kwargs):
        """``run_with_hooks`` (``fwd_hooks=[(name, fn)]`` may name the SAE's hook points) with ``saes`` spliced in."""
        with self.saes(saes, use_error_term):
            return self.run_with_hooks(*model_args, **model_kwargs)

    def _restore(self, name: str) -> None:
        self._set_module(name, self._replaced.pop(name))

    def _set_module(self, name: str, module: nn.Module) -> None:
        parent, _, child = name.rpartition(".")
        setattr(self.get_submodule(parent) if parent else self, child, module)
