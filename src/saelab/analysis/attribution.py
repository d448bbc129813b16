"""Which features push a target token's logit at the last position of a prompt (direct path only).

The quantity explained (``total``) is the **direct logit contribution of the hook activation**: the hook's
activation ``x`` at the last position, taken straight to the output through the final norm linearised
at this very forward pass (its 1/RMS factor frozen at the value it had on this prompt; mean removed first
for LayerNorm) and the target's unembedding row::

    total = x . d,   d = P(g * U[target]) / rms(final norm input at the last position)

(``g`` the final norm's weight, ``P`` the centring projection for LayerNorm, identity for RMSNorm). Later
layers' reactions to ``x`` are not part of it. The SAE splits ``x = sum_i f_i W_dec[i] + b_dec + error``,
so the total splits exactly into feature parts ``f_i * (W_dec[i] . d)``, a ``b_dec`` part ``b_dec . d``
and an error part ``(x - x_hat) . d``. For a residual-stream hook right before the final norm (the last
block's ``hook_resid_post``), ``total`` is the target's logit itself, less any logit bias. A transcoder's
``x`` is its output hook's activation; a crosscoder's or CLT's, the last hook it writes, split by its
decoder's part for that hook (a CLT's: what every block's latents write there). A skip transcoder's linear
skip term ``x_in W_skip^T`` is a fourth part, ``skip``.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import MISSING, dataclass

import torch

from saelab.analysis.loading import Loaded, token_strings
from saelab.options import option
from saelab.analysis.logits import final_norm, logit_directions
from saelab.models import hooked, lm_logits



@dataclass
class AttributeConfig:
    """``saelab attribute``: which features push a target token's logit at the end of a prompt."""

    prompt: str = option(MISSING, "Text whose next token is predicted, e.g. \"The capital of France is\".")
    target: str = option(MISSING, "The next token to explain, with its leading space, e.g. \" Paris\" (a text of "
                         "several tokens: its first token).")
    top: int = option(10, "Features shown in each direction.")

    def __post_init__(self):
        if self.top <= 0:
            raise ValueError(f"--top must be positive, got {self.top}")

@dataclass
class Attribution:
    prompt: str
    target: str                              # the token attributed (first token of the target text)
    target_id: int
    total: float                             # x . d: direct contribution of the hook activation
    error: float                             # (x - x_hat) . d
    bias: float                              # b_dec . d
    features: torch.Tensor                   # [d_sae] f_i * (W_dec[i] . d) (0 for inactive features)
    activations: torch.Tensor                # [d_sae] f_i at the last position
    logit: float                             # the model's actual logit for the target (for scale)
    rank: int                                # the target's rank among next-token predictions (0 = top)
    target_tokens: list[str]                 # the target text's tokens (only the first is attributed)
    skip: float = 0.0                        # a skip transcoder's (x_in W_skip^T) . d; 0 for other kinds

    @property
    def feature_sum(self) -> float:
        return float(self.features.double().sum())

    def top(self, n: int = 10, negative: bool = False) -> list[tuple[int, float, float]]:
        """(feature, activation, contribution) of the ``n`` largest positive (or negative) contributions."""
        values = -self.features if negative else self.features
        order = values.argsort(descending=True)[:n]
        return [(int(i), float(self.activations[i]), float(self.features[i])) for i in order
                if (self.features[i] < 0 if negative else self.features[i] > 0)]


@torch.no_grad()
def attribute(loaded: Loaded, prompt: str, target: str) -> Attribution:
    """Split the hook activation's direct contribution to ``target``'s logit (at the last prompt position)
    into per-feature parts, the SAE's ``b_dec`` and its reconstruction error. The parts sum to ``total``."""
    target_ids = loaded.tokenizer(target, add_special_tokens=False)["input_ids"]
    if not target_ids:
        raise ValueError("the target is empty: give the token to attribute, e.g. --target ' Paris'")
    target_id = target_ids[0]
    ids = loaded.tokenize(prompt)
    norm = final_norm(loaded.model)
    seen: dict[str, torch.Tensor] = {}

    def recording(name: str):
        return lambda act: seen.__setitem__(name, act[0, -1].detach().float())

    def record_norm(_module, args, kwargs):
        seen["final"] = (args[0] if args else kwargs["hidden_states"])[0, -1].detach().float()

    handle = norm.module.register_forward_pre_hook(record_norm, with_kwargs=True)
    try:
        with ExitStack() as stack:  # what it reads (each hook), and what it writes nearest the output
            for hook in loaded.reads:
                stack.enter_context(hooked(loaded.model, hook, recording(hook.name)))
            stack.enter_context(hooked(loaded.model, loaded.writes, recording("out")))
            logits = lm_logits(loaded.model, ids)[0, -1].float()
    finally:
        handle.remove()
    direction = logit_directions(loaded.model, [target_id])[0] * norm.inverse_rms(seen["final"])
    sae = loaded.sae
    x_in = torch.cat([seen[hook.name] for hook in loaded.reads])[None]
    f = sae.encode(x_in)[0]
    at_last = lambda v: v.reshape(sae.cfg.n_hooks, -1)[-1]  # noqa: E731 - a crosscoder's / CLT's part at its last hook
    x, x_hat = seen["out"], at_last(sae.reconstruction(x_in, f[None])[0])
    skip = at_last(sae.skip(x_in)[0]) if sae.cfg.skip else None
    parts = f * (sae.decoder_by_hook()[:, -1].float() @ direction)
    b_dec = at_last(sae.b_dec)
    return Attribution(
        prompt=prompt, target=token_strings(loaded.tokenizer, [target_id])[0], target_id=target_id,
        total=float(x.double() @ direction.double()), error=float((x - x_hat).double() @ direction.double()),
        bias=float(b_dec.double() @ direction.double()), features=parts.cpu(), activations=f.cpu(),
        logit=float(logits[target_id]), rank=int((logits > logits[target_id]).sum()),
        target_tokens=token_strings(loaded.tokenizer, target_ids),
        skip=float(skip.double() @ direction.double()) if skip is not None else 0.0)


def format_attribution(result: Attribution, n: int = 10) -> str:
    """Totals and the top positive and negative features."""
    lines = [f"prompt {result.prompt!r} -> target {result.target!r} (token {result.target_id}; the model's logit "
             f"{result.logit:.3f}, rank {result.rank} among next tokens)"]
    if len(result.target_tokens) > 1:
        lines.append(f"note: the target is {len(result.target_tokens)} tokens {result.target_tokens}; "
                     "only the first is attributed")
    active = int((result.activations > 0).sum())
    lines += [
        "direct contribution of the hook activation at the last position to this logit",
        "(through the final norm, its scale frozen at this forward pass, and the unembedding):",
        f"  total            {result.total:+.4f}",
        f"  = features       {result.feature_sum:+.4f}   ({active} active)",
        f"  + SAE error      {result.error:+.4f}",
        f"  + b_dec          {result.bias:+.4f}",
        *([f"  + skip term      {result.skip:+.4f}   (x_in W_skip^T)"] if result.skip else []),
        "",
        f"{'feature':>8}  {'activation':>10}  {'contribution':>12}",
    ]
    for title, rows in (("pushes up", result.top(n)), ("pushes down", result.top(n, negative=True))):
        lines.append(f"{title}:")
        lines += [f"{i:>8}  {a:>10.3f}  {c:>+12.4f}" for i, a, c in rows] or ["  (none)"]
    return "\n".join(lines)
