"""Steering: greedy generation with a feature's decoder direction added at the hook, or its activation clamped.

- ``add``: ``strength * W_dec[feature]`` is added to the hook's activation at every position (the prompt's
  and each generated token's).
- ``clamp``: the SAE is spliced in with its error term (``splice(..., error_term=True, intervene=...)``) and
  the feature's activation is set to a value at every position; everything the SAE does not reconstruct
  is kept, so only the change of that one latent reaches the model. A crosscoder or CLT (several hooks) is
  clamped on clean runs: ``clamped_hook_values``.
"""

from __future__ import annotations

import inspect
import shutil
import textwrap
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import MISSING, dataclass

import torch

from saelab.analysis.loading import Loaded, check_feature
from saelab.evals.metrics import splice
from saelab.models import capture, hooked, is_transformer_lens, lm_logits
from saelab.options import option


@dataclass
class SteerConfig:
    """``saelab steer``: greedy generation with and without one feature's direction added (or clamped)."""

    feature: int = option(MISSING, "Feature (latent) index to steer with.")
    prompt: str = option(MISSING, "Text to continue, e.g. \"I think that\".")
    strength: float | None = option(None, "Multiple of the feature's decoder direction added at every position "
                                    "(8 unless --clamp is given).", exclusive="how")
    clamp: float | None = option(None, "Instead of adding: set the feature's activation to VALUE at every "
                                 "position (SAE spliced in with error term).", metavar="VALUE", exclusive="how")
    max_new_tokens: int = option(40, "Tokens to generate (generation stops early at EOS).")

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise ValueError(f"--max-new-tokens must be positive, got {self.max_new_tokens}")
        if self.strength is not None and self.clamp is not None:
            raise ValueError("give --strength or --clamp, not both")
        if self.clamp is None and self.strength is None:
            self.strength = 8.0


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
    """The ``max_new_tokens`` most likely next tokens, one at a time (KV cache; stops after EOS)."""
    if max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must not be negative, got {max_new_tokens}")
    if is_transformer_lens(model):
        return _greedy_generate_uncached(model, input_ids, max_new_tokens, eos_token_id)
    out: list[int] = []
    past: dict = {}
    # transformers 5.x names the KV cache ``cache``; 4.x ``past_key_values``.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    step_input = input_ids
    for _ in range(max_new_tokens):
        result = model(input_ids=step_input, use_cache=True, **past)
        cache = getattr(result, cache_arg, None)
        past = {cache_arg: cache if cache is not None else result.past_key_values}
        token = int(result.logits[0, -1].float().argmax())
        out.append(token)
        if eos_token_id is not None and token == eos_token_id:
            break
        step_input = torch.tensor([[token]], device=input_ids.device)
    return out


def _greedy_generate_uncached(model, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None,
                              step_context=None) -> list[int]:
    """Greedy generation re-running the whole sequence each step (TransformerLens models: no HF KV cache; a
    crosscoder's clamp: ``step_context(sequence)``, entered around each step's forward, sets it up anew)."""
    out: list[int] = []
    ids = input_ids
    for _ in range(max_new_tokens):
        with step_context(ids) if step_context is not None else nullcontext():
            token = int(lm_logits(model, ids)[0, -1].float().argmax())
        out.append(token)
        if eos_token_id is not None and token == eos_token_id:
            break
        ids = torch.cat([ids, torch.tensor([[token]], device=ids.device)], dim=1)
    return out


@contextmanager
def added_direction(loaded: Loaded, feature: int, strength: float):
    """Inside: each activation the decoder writes (the hook's; a transcoder's output hook; each of a
    crosscoder's or CLT's hooks) is ``x + strength * W_dec[feature]`` (its part for that hook) at every position."""
    check_feature(loaded.sae, feature)
    rows = loaded.sae.decoder_by_hook()[feature].detach()  # [hooks written, width]

    def adding(direction: torch.Tensor):
        return lambda act: act + (strength * direction).to(device=act.device, dtype=act.dtype)

    with ExitStack() as stack:
        for hook, direction in zip(loaded.written, rows):
            stack.enter_context(hooked(loaded.model, hook, adding(direction)))
        yield


def clamped(loaded: Loaded, feature: int, value: float):
    """Inside: the feature's activation is ``value`` at every position; the SAE's error term is kept. A
    dictionary over several hooks is clamped by ``steer`` (``clamped_hook_values``), not here."""
    check_feature(loaded.sae, feature)
    if loaded.sae.cfg.n_hooks > 1:
        raise ValueError(f"a {loaded.sae.cfg.kind} writes {loaded.sae.cfg.n_hooks} hooks: its latents need every "
                         "hook's clean activation, so it is clamped on clean runs by steer() (clamped_hook_values), "
                         "not by a splice")

    def clamp(latents: torch.Tensor) -> None:
        latents[..., feature] = value

    return splice(loaded.model, loaded.sae, loaded.hook, error_term=True, intervene=clamp)


@torch.no_grad()
def clamped_hook_values(loaded: Loaded, tokens: torch.Tensor, feature: int, value: float) -> dict[str, torch.Tensor]:
    """A crosscoder or CLT with ``feature`` clamped to ``value`` at every position of ``tokens``: each hook it
    writes, by name, its clean activation plus the decoded change of the latents (computed from the clean
    activations of every hook it reads, so the error terms are kept). Put in place of those activations all
    together, as ``saelab eval`` replaces all hooks at once: what the change at one hook would do to a later one
    is overwritten there."""
    check_feature(loaded.sae, feature)
    sae = loaded.sae
    hooks = list({hook.name: hook for hook in (*loaded.reads, *loaded.written)}.values())
    acts = capture(loaded.model, tokens.to(loaded.device), hooks)
    latents = sae.encode(torch.cat([acts[hook.name] for hook in loaded.reads], -1).float())
    edited = latents.clone()
    edited[..., feature] = value
    change = (sae.decode(edited) - sae.decode(latents)).view(*latents.shape[:-1], sae.cfg.n_hooks, -1)
    return {hook.name: acts[hook.name].float() + change[..., j, :] for j, hook in enumerate(loaded.written)}


@contextmanager
def _clamped_on_clean_run(loaded: Loaded, sequence: torch.Tensor, feature: int, value: float):
    """Inside: every hook a crosscoder or CLT writes holds its ``clamped_hook_values`` for ``sequence``."""
    values = clamped_hook_values(loaded, sequence, feature, value)
    with ExitStack() as stack:
        for hook in loaded.written:
            stack.enter_context(hooked(loaded.model, hook, lambda act, v=values[hook.name]: v.to(act.dtype)))
        yield


@dataclass
class SteeringResult:
    prompt: str
    feature: int
    mode: str                # "add" or "clamp"
    amount: float            # the strength (add) or the clamp value
    plain: str
    steered: str
    plain_ids: list[int]
    steered_ids: list[int]


def steer(loaded: Loaded, prompt: str, feature: int, strength: float | None = None, clamp: float | None = None,
          max_new_tokens: int = 40) -> SteeringResult:
    """Greedy continuations of ``prompt`` without and with the intervention (``strength`` or ``clamp``)."""
    check_feature(loaded.sae, feature)
    if (strength is None) == (clamp is None):
        raise ValueError("give exactly one of a steering strength and a clamp value")
    ids = loaded.tokenize(prompt)
    eos = loaded.tokenizer.eos_token_id

    def generate(context) -> list[int]:
        with context:
            return greedy_generate(loaded.model, ids, max_new_tokens, eos)

    plain_ids = generate(nullcontext())
    if clamp is not None and loaded.sae.cfg.n_hooks > 1:
        # Each step a clean run first, then the run with those values in place (no KV cache: twice the work).
        def clamping(sequence):
            return _clamped_on_clean_run(loaded, sequence, feature, clamp)

        steered_ids = _greedy_generate_uncached(loaded.model, ids, max_new_tokens, eos, clamping)
    elif clamp is not None:
        steered_ids = generate(clamped(loaded, feature, clamp))
    else:
        steered_ids = generate(added_direction(loaded, feature, strength))
    decode = loaded.tokenizer.decode
    return SteeringResult(prompt, feature, "clamp" if clamp is not None else "add",
                          clamp if clamp is not None else strength, decode(plain_ids), decode(steered_ids),
                          plain_ids, steered_ids)


def format_steering(result: SteeringResult, width: int | None = None) -> str:
    """The prompt, then the plain and steered continuations in two columns."""
    width = width or shutil.get_terminal_size((120, 24)).columns
    column = max(20, (width - 3) // 2)
    how = (f"feature {result.feature} clamped to {result.amount:g} (SAE spliced in with its error term)"
           if result.mode == "clamp" else f"{result.amount:g} x W_dec[{result.feature}] added at every position")
    left = _wrap(result.plain, column)
    right = _wrap(result.steered, column)
    lines = [f"prompt:  {result.prompt!r}", f"steered: {how}", "", f"{'plain':<{column}} | steered",
             f"{'-' * column}-+-{'-' * column}"]
    for i in range(max(len(left), len(right))):
        a = left[i] if i < len(left) else ""
        b = right[i] if i < len(right) else ""
        lines.append(f"{a:<{column}} | {b}")
    if result.plain_ids == result.steered_ids:
        lines.append("(identical continuations)")
    return "\n".join(lines)


def _wrap(text: str, width: int) -> list[str]:
    out = []
    for paragraph in text.split("\n"):
        out.extend(textwrap.wrap(paragraph, width, replace_whitespace=False, drop_whitespace=False) or [""])
    return out
