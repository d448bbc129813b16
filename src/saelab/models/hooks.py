"""Hook points: name an activation inside a model, read it, replace it, stop the forward pass after it.

Names follow TransformerLens (``blocks.6.hook_resid_post``) and are mapped onto the module tree of
Hugging Face models of the Llama (Llama, SmolLM, Qwen, Mistral), GPT-2, GPT-NeoX (Pythia) and Gemma
families. A raw module path (``model.layers.6.mlp``) names that module's output.

Around each MLP (what transcoders read and write), as in TransformerLens:
- ``blocks.L.hook_mlp_in``: the residual stream the MLP's norm reads (resid_mid in sequential blocks, resid_pre
  in parallel ones such as Pythia's); replacing it changes the MLP's input only, not the residual stream;
- ``blocks.L.ln2.hook_normalized``: that norm's output, the vector the MLP itself reads (Gemma 2/3: after
  ``pre_feedforward_layernorm``);
- ``blocks.L.mlp.hook_post``: the MLP's hidden layer, after its activation function (``d_mlp`` wide), the input
  of its output projection;
- ``blocks.L.hook_mlp_out``: what the block adds to the residual stream from its MLP (Gemma 2/3: after the
  ``post_feedforward_layernorm`` that follows the MLP, so a transcoder from ``ln2.hook_normalized`` to it
  includes that norm).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from saelab.models.transformer_lens_backend import (is_transformer_lens, lm_forward, tl_has_hook, tl_hook_layer,
                                                    tl_hook_names)

# Where each family keeps its list of transformer blocks.
BLOCK_LIST_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers",
                    "transformer.layers", "model.language_model.layers")
ATTENTION_NAMES = ("self_attn", "attn", "attention")
MLP_NAMES = ("mlp", "feed_forward")
TL_KINDS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
            "hook_mlp_in", "ln2.hook_normalized", "mlp.hook_post")
# Where each family's MLP keeps its output projection (whose input is the hidden layer, mlp.hook_post).
MLP_OUTPUT_PROJECTIONS = ("down_proj", "c_proj", "dense_4h_to_h", "fc2")
_TL_NAME = re.compile(r"^blocks\.(\d+)\.((?:ln2\.|mlp\.)?hook_\w+)$")


class HookNameError(ValueError):
    pass


# Several hook points named as one (what a crosscoder reads and writes): blocks.3.hook_resid_post+blocks.6.hook_resid_post
HOOK_LIST_SEPARATOR = "+"


def split_hook_list(name: str) -> list[str]:
    """The hook names in ``name`` (one, or several joined by ``+``)."""
    return [part.strip() for part in str(name).split(HOOK_LIST_SEPARATOR) if part.strip()]


def is_transformer_lens_name(name: str) -> bool:
    """Whether ``name`` is a TransformerLens-style hook name saelab maps, e.g. ``blocks.6.hook_resid_post``."""
    match = _TL_NAME.match(name)
    return bool(match) and match.group(2) in TL_KINDS


@dataclass(frozen=True)
class HookPoint:
    """One activation: the output (or input) of one module."""

    name: str
    module_path: str
    reads_input: bool = False


class StopForward(Exception):
    """Raised inside a hook once every wanted activation is captured: later layers never run."""


def block_list_path(model: nn.Module) -> str:
    for path in BLOCK_LIST_PATHS:
        module = _get_module(model, path)
        if isinstance(module, nn.ModuleList):
            return path
    raise HookNameError(
        f"cannot find the transformer blocks of {type(model).__name__}; name hook points by module path "
        "instead (see `saelab hooks --model ...`)."
    )


def n_layers(model: nn.Module) -> int:
    if is_transformer_lens(model):
        return model.cfg.n_layers
    return len(_get_module(model, block_list_path(model)))


def resolve_hook(model: nn.Module, name: str) -> HookPoint:
    """Turn a TransformerLens-style name or a module path into a HookPoint; unknown names raise."""
    if is_transformer_lens(model):  # its hook points are modules named by the hook name
        if tl_has_hook(model, name):
            return HookPoint(name=name, module_path=name)
        raise HookNameError(f"unknown hook point {name!r} for TransformerLens model {type(model).__name__}; "
                            f"it has {', '.join(tl_hook_names(model)[:12])} ... (model.hook_dict lists them all)")
    match = _TL_NAME.match(name)
    if match:
        layer, kind = int(match.group(1)), match.group(2)
        layers = n_layers(model)
        if kind in TL_KINDS and 0 <= layer < layers:
            hook = _tl_hook(model, name, layer, kind)
            if hook is not None:
                return hook
    elif name and _get_module(model, name) is not None:
        return HookPoint(name=name, module_path=name)
    raise HookNameError(_unknown_hook_message(model, name))


def hook_names(model: nn.Module) -> list[str]:
    """Every TransformerLens-style name this model supports."""
    if is_transformer_lens(model):
        return tl_hook_names(model)
    names = []
    for layer in range(n_layers(model)):
        for kind in TL_KINDS:
            if _tl_hook(model, f"blocks.{layer}.{kind}", layer, kind) is not None:
                names.append(f"blocks.{layer}.{kind}")
    return names


def hook_layer(model: nn.Module, hook: HookPoint) -> int | None:
    """The block index a hook sits in, or None when it sits outside the blocks."""
    if is_transformer_lens(model):
        return tl_hook_layer(hook.name)
    prefix = block_list_path(model) + "."
    if hook.module_path.startswith(prefix):
        return int(hook.module_path[len(prefix):].split(".")[0])
    return None


def _tl_hook(model: nn.Module, name: str, layer: int, kind: str) -> HookPoint | None:
    block_path = f"{block_list_path(model)}.{layer}"
    block = _get_module(model, block_path)
    if kind == "hook_resid_pre":
        return HookPoint(name, block_path, reads_input=True)
    if kind == "hook_resid_post":
        return HookPoint(name, block_path)
    sandwich = hasattr(block, "pre_feedforward_layernorm")  # Gemma 2/3: norms after attention and MLP
    mlp = _first_child(block, MLP_NAMES)
    if kind == "hook_attn_out":
        child = "post_attention_layernorm" if sandwich else _first_child(block, ATTENTION_NAMES)
    elif kind == "hook_mlp_out":
        child = "post_feedforward_layernorm" if sandwich else mlp
    elif kind == "ln2.hook_normalized":  # the MLP's own input
        return HookPoint(name, f"{block_path}.{mlp}", reads_input=True) if mlp else None
    elif kind == "mlp.hook_post":
        projection = _first_child(getattr(block, mlp), MLP_OUTPUT_PROJECTIONS) if mlp else None
        return HookPoint(name, f"{block_path}.{mlp}.{projection}", reads_input=True) if projection else None
    else:  # hook_resid_mid and hook_mlp_in: the input of the norm in front of the MLP
        parallel = getattr(model.config, "use_parallel_residual", False) or getattr(model.config, "parallel_attn", False)
        if parallel and kind == "hook_resid_mid":  # no residual stream between attention and MLP
            return None
        child = _first_child(block, ("pre_feedforward_layernorm",) if sandwich else ("post_attention_layernorm", "ln_2"))
        return HookPoint(name, f"{block_path}.{child}", reads_input=True) if child else None
    return HookPoint(name, f"{block_path}.{child}") if child else None


def _first_child(module: nn.Module, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if isinstance(getattr(module, n, None), nn.Module)), None)


def _get_module(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _unknown_hook_message(model: nn.Module, name: str) -> str:
    try:
        names = hook_names(model)
        layers = n_layers(model)
        shown = ", ".join(f"blocks.{{0..{layers - 1}}}.{k}" for k in TL_KINDS if f"blocks.0.{k}" in names)
    except HookNameError:
        shown = "(none: this model's blocks were not recognised)"
    return (f"unknown hook point {name!r} for {type(model).__name__}. Valid names: {shown}; "
            "or a module path such as 'model.layers.6.mlp' (its output).")


def _first_tensor(value):
    """The activation inside a module's output: a tensor, the first item of a tuple, or the first
    field of a ModelOutput (``model.model`` returns one)."""
    if isinstance(value, (tuple, list)):
        return value[0]
    if isinstance(value, Mapping):
        return next(iter(value.values()))
    return value


def _replace_first(value, new: torch.Tensor):
    if isinstance(value, tuple):
        return (new, *value[1:])
    if isinstance(value, list):
        return [new, *value[1:]]
    if isinstance(value, Mapping):
        value[next(iter(value.keys()))] = new
        return value
    return new


@contextmanager
def hooked(model: nn.Module, hook: HookPoint, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Call ``fn(activation)`` whenever the hook point is computed; a returned tensor replaces it."""
    module = model.get_submodule(hook.module_path)
    handles = []
    if hook.reads_input:
        # hook_resid_mid is read at the input of the norm in front of the MLP, but the block adds the MLP's
        # output to its own copy of that tensor, not to what the norm received. A replacement must reach
        # the residual stream too, so the block's output gets the same change (new - old) added.
        match = _TL_NAME.match(hook.name)
        mid_block = hook.module_path.rsplit(".", 1)[0] if match and match.group(2) == "hook_resid_mid" else None
        deltas: list[torch.Tensor] = []

        def replaced(old: torch.Tensor):
            new = fn(old)
            if new is not None and mid_block is not None:
                deltas.append(new - old)
            return new

        def pre_hook(_module, args, kwargs):
            if args:
                new = replaced(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            new = replaced(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})
        if mid_block is not None:
            def block_pre_hook(_module, _args):
                deltas.clear()

            def block_hook(_module, _args, output):
                if not deltas:
                    return None
                delta = deltas.pop()
                return _replace_first(output, _first_tensor(output) + delta.to(_first_tensor(output).dtype))
            block = model.get_submodule(mid_block)
            handles.append(block.register_forward_pre_hook(block_pre_hook))
            handles.append(block.register_forward_hook(block_hook))
        handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
    else:
        def post_hook(_module, _args, output):
            new = fn(_first_tensor(output))
            return None if new is None else _replace_first(output, new)
        handles.append(module.register_forward_hook(post_hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def hook_widths(model: nn.Module, hooks: list[HookPoint], token_id: int) -> dict[str, int]:
    """Each hook's activation width, from a forward pass over a few copies of ``token_id`` (e.g. BOS)."""
    probe = torch.full((1, 4), int(token_id), device=next(model.parameters()).device)
    return {name: act.shape[-1] for name, act in capture(model, probe, hooks).items()}


def capture(model: nn.Module, input_ids: torch.Tensor, hooks: list[HookPoint],
            attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Run the model only as far as it must go to compute every hook; return ``{name: [batch, seq, d]}``."""
    captured: dict[str, torch.Tensor] = {}
    wanted = list({h.name: h for h in hooks}.values())  # the same hook twice is captured once
    if not wanted:
        return captured

    def recorder(name: str):
        def record(act: torch.Tensor):
            captured[name] = act.detach()
            if len(captured) == len(wanted):
                raise StopForward
        return record

    with _all_hooked(model, [(h, recorder(h.name)) for h in wanted]):
        try:
            lm_forward(model, input_ids, attention_mask)
        except StopForward:
            pass
    missing = [h.name for h in hooks if h.name not in captured]
    if missing:
        raise HookNameError(f"hook points {missing} never fired during the forward pass")
    return captured


@contextmanager
def _all_hooked(model, pairs):
    if not pairs:
        yield
        return
    (hook, fn), rest = pairs[0], pairs[1:]
    with hooked(model, hook, fn), _all_hooked(model, rest):
        yield
