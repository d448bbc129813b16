"""Metrics the field reports for an SAE on held-out text (definitions: SAEBench core / SAELens evals).

Reconstruction metrics (L0, FVU, cosine, L2 ratio) are taken over the positions the SAE is meant for
(special-token positions left out unless asked). Downstream metrics splice the SAE into the forward
pass at those same positions and compare next-token predictions with the clean model and with the
activation zero-ablated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from saelab.models.hooks import HookPoint, capture, hooked
from saelab.sae import SAE

DENSE_THRESHOLD = 0.1  # a latent active on more than 10% of tokens counts as dense


@contextmanager
def splice(model, sae: SAE, hook: HookPoint, keep: torch.Tensor | None = None, error_term: bool = False,
           intervene: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """Run ``model`` with the SAE's reconstruction in place of the hook's activation.

    ``keep`` ([batch, seq] bool) limits the replacement to those positions. With ``error_term=True`` the
    SAE's error is added back, so outputs are unchanged unless ``intervene`` edits the latents.
    """
    def replace(act: torch.Tensor) -> torch.Tensor:
        latents = sae.encode(act.float())
        if intervene is not None:
            latents = intervene(latents)
        new = sae.decode(latents)
        if error_term:
            new = new + (act.float() - sae.decode(sae.encode(act.float())))
        new = new.to(act.dtype)
        return new if keep is None else torch.where(keep[..., None].to(act.device), new, act)

    with hooked(model, hook, replace):
        yield


@contextmanager
def zero_ablate(model, hook: HookPoint, keep: torch.Tensor | None = None):
    def replace(act: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(act) if keep is None else act.masked_fill(keep[..., None].to(act.device), 0.0)

    with hooked(model, hook, replace):
        yield


class _Totals:
    """Running sums in float64, so 1e-4 agreement holds over many tokens."""

    def __init__(self, d_in: int, d_sae: int):
        self.tokens = 0
        self.sums = {name: 0.0 for name in ("l0", "l1", "sq_err", "cossim", "l2_ratio")}
        self.x_sum = torch.zeros(d_in, dtype=torch.float64)
        self.x_sq_sum = torch.zeros(d_in, dtype=torch.float64)
        self.fired = torch.zeros(d_sae, dtype=torch.float64)
        self.ce = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
        self.kl = {"sae": 0.0, "zero": 0.0}
        self.predictions = 0


@torch.no_grad()
def evaluate(model, sae: SAE, hook: HookPoint, token_batches: Iterable[torch.Tensor],
             keep_mask: Callable[[torch.Tensor], torch.Tensor], downstream: bool = True) -> dict:
    """Metrics of ``sae`` at ``hook`` over the given ``[batch, seq]`` token batches.

    Returns the keys named in the evaluation spec, plus ``firing_frequency`` (a [d_sae] tensor).
    """
    device = next(model.parameters()).device
    sae = sae.to(device)
    totals = _Totals(sae.cfg.d_in, sae.cfg.d_sae)
    for tokens in token_batches:
        tokens = tokens.to(device)
        keep = keep_mask(tokens.cpu()).to(device)
        if not downstream:
            act = capture(model, tokens, [hook])[hook.name]
            _add_reconstruction(totals, sae, act[keep].float())
            continue
        captured = {}
        with hooked(model, hook, lambda act: captured.__setitem__("act", act.detach())):
            clean_logits = model(input_ids=tokens, use_cache=False).logits
        _add_reconstruction(totals, sae, captured["act"][keep].float())
        with splice(model, sae, hook, keep):
            sae_logits = model(input_ids=tokens, use_cache=False).logits
        with zero_ablate(model, hook, keep):
            zero_logits = model(input_ids=tokens, use_cache=False).logits
        _add_downstream(totals, tokens, keep, clean_logits, sae_logits, zero_logits)
    return _summarise(totals, downstream)


def _add_reconstruction(totals: _Totals, sae: SAE, x: torch.Tensor) -> None:
    f = sae.encode(x)
    x_hat = sae.decode(f)
    totals.tokens += len(x)
    totals.sums["l0"] += (f != 0).sum().item()
    totals.sums["l1"] += f.abs().sum().item()
    totals.sums["sq_err"] += (x - x_hat).double().pow(2).sum().item()
    totals.sums["cossim"] += F.cosine_similarity(x, x_hat, dim=-1).double().sum().item()
    totals.sums["l2_ratio"] += (x_hat.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)).double().sum().item()
    totals.x_sum += x.double().sum(0).cpu()
    totals.x_sq_sum += x.double().pow(2).sum(0).cpu()
    totals.fired += (f != 0).sum(0).double().cpu()


def _add_downstream(totals: _Totals, tokens, keep, clean, with_sae, zero) -> None:
    # Next-token predictions whose target is a position the SAE is applied to (not a special token).
    targets = tokens[:, 1:]
    mask = keep[:, 1:]
    logp = {name: F.log_softmax(logits[:, :-1].float(), dim=-1)
            for name, logits in (("clean", clean), ("sae", with_sae), ("zero", zero))}
    for name, lp in logp.items():
        nll = -lp.gather(-1, targets[..., None]).squeeze(-1)
        totals.ce[name] += nll[mask].double().sum().item()
    p_clean = logp["clean"].exp()
    for name in ("sae", "zero"):
        kl = (p_clean * (logp["clean"] - logp[name])).sum(-1)
        totals.kl[name] += kl[mask].double().sum().item()
    totals.predictions += int(mask.sum().item())


def _summarise(t: _Totals, downstream: bool) -> dict:
    n = max(t.tokens, 1)
    mean = t.x_sum / n
    total_variance = (t.x_sq_sum - n * mean.pow(2)).sum().item()
    fvu = t.sums["sq_err"] / total_variance if total_variance > 0 else float("nan")
    frequency = t.fired / n
    result = {
        "tokens": t.tokens,
        "l0": t.sums["l0"] / n,
        "l1": t.sums["l1"] / n,
        "mse": t.sums["sq_err"] / (n * len(mean)),
        "fvu": fvu,
        "explained_variance": 1.0 - fvu,
        "cossim": t.sums["cossim"] / n,
        "l2_ratio": t.sums["l2_ratio"] / n,
        "dead_fraction": (frequency == 0).double().mean().item(),
        "dense_fraction": (frequency > DENSE_THRESHOLD).double().mean().item(),
    }
    if downstream and t.predictions:
        m = t.predictions
        ce_clean, ce_sae, ce_zero = t.ce["clean"] / m, t.ce["sae"] / m, t.ce["zero"] / m
        kl_sae, kl_zero = t.kl["sae"] / m, t.kl["zero"] / m
        result.update({
            "ce_clean": ce_clean, "ce_with_sae": ce_sae, "ce_zero_ablation": ce_zero,
            "ce_loss_score": (ce_zero - ce_sae) / (ce_zero - ce_clean) if ce_zero != ce_clean else float("nan"),
            "kl_with_sae": kl_sae, "kl_zero_ablation": kl_zero,
            "kl_score": (kl_zero - kl_sae) / kl_zero if kl_zero > 0 else float("nan"),
        })
    result["firing_frequency"] = frequency.float()
    return result
