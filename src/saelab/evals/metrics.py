"""Metrics the field reports for an SAE on held-out text (definitions: SAEBench core / SAELens evals).

Reconstruction metrics (L0, FVU, cosine, L2 ratio) are taken over the positions the SAE is meant for
(special-token positions left out unless asked). Downstream metrics splice the SAE into the forward
pass at those same positions and compare next-token predictions with the clean model and with the
activation zero-ablated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F

from saelab.models.hooks import HookNameError, HookPoint, capture, hooked, resolve_hook, split_hook_list
from saelab.models.transformer_lens_backend import lm_logits
from saelab.sae import SAE

DENSE_THRESHOLD = 0.1  # a latent active on more than 10% of tokens counts as dense
# The scalar metrics ``evaluate`` returns, in the order reports show them.
METRIC_KEYS = ("l0", "l1", "mse", "fvu", "explained_variance", "cossim", "l2_ratio", "ce_clean", "ce_with_sae",
               "ce_zero_ablation", "ce_loss_score", "kl_with_sae", "kl_zero_ablation", "kl_score",
               "dead_fraction", "dense_fraction", "tokens")
# What a crosscoder's result gives for each of its hooks (by_hook).
BY_HOOK_KEYS = ("fvu", "explained_variance", "mse", "cossim", "ce_with_sae", "ce_zero_ablation", "ce_loss_score",
                "kl_with_sae", "kl_score")
DOWNSTREAM_KEYS = ("ce_clean", "ce_with_sae", "ce_zero_ablation", "ce_loss_score", "kl_with_sae",
                   "kl_zero_ablation", "kl_score")


def sae_hook(model, sae: SAE, hook: HookPoint | str | None = None) -> HookPoint:
    """The hook point to use: ``hook`` (a HookPoint or a name), else the one in the SAE's cfg metadata."""
    if isinstance(hook, HookPoint):
        return hook
    if hook is None:
        hook = sae.cfg.metadata.get("hook_name")
        if not hook:
            raise HookNameError("this SAE's cfg.json metadata names no hook_name; pass the hook point "
                                "explicitly (e.g. hook='blocks.6.hook_resid_post')")
    return resolve_hook(model, hook)


def written_hooks(model, sae: SAE, read: list[HookPoint]) -> list[HookPoint]:
    """Where the dictionary's output goes: the hooks it reads (``read``), or a transcoder's (CLT's) output hooks
    from its metadata."""
    if not sae.cfg.separate_output:
        return read
    names = sae.cfg.written_hooks
    if len(names) != sae.cfg.n_hooks:
        raise HookNameError(f"this {sae.cfg.kind}'s cfg.json metadata names {len(names)} output hook(s) "
                            f"(hook_name_out{', hook_names_out' if sae.cfg.n_hooks > 1 else ''}), it writes "
                            f"{sae.cfg.n_hooks}; add them to the metadata (e.g. blocks.6.hook_mlp_out)")
    return [resolve_hook(model, name) for name in names]


@contextmanager
def splice(model, sae: SAE, hook: HookPoint | str | None = None, keep: torch.Tensor | None = None,
           error_term: bool = False, intervene: Callable[[torch.Tensor], torch.Tensor | None] | None = None):
    """Run ``model`` with the SAE's reconstruction in place of the hook's activation.

    ``hook``: a HookPoint, a hook name, or None for the SAE's ``cfg.metadata["hook_name"]``.
    ``keep`` ([batch, seq] bool) limits the replacement to those positions. ``intervene(latents)`` may
    edit the ``[batch, seq, d_sae]`` latents (return the edited tensor, or edit in place and return None).
    With ``error_term=True`` the SAE's reconstruction error is added back, so the output is exactly the
    clean output unless ``intervene`` changes the latents; then only the decoded change is applied.

    A transcoder reads ``hook`` and its output replaces the activation at its ``hook_name_out`` (the MLP runs
    as usual; its output is what is replaced).
    """
    hook = sae_hook(model, sae, hook)
    [out_hook] = written_hooks(model, sae, [hook])

    def replace(x_act: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        x = x_act.float()
        latents = sae.encode(x)
        edited = latents
        if intervene is not None:
            edited = latents.clone() if error_term else latents
            returned = intervene(edited)
            edited = edited if returned is None else returned
        if error_term:
            # act + (decode(edited) - decode(latents)): untouched latents give back act itself, bit for bit.
            if edited is latents:
                return act
            new = act.float() + (sae.decode(edited) - sae.decode(latents))
        else:
            new = sae.reconstruction(x, edited)
        new = new.to(act.dtype)
        return new if keep is None else torch.where(keep[..., None].to(act.device), new, act)

    if out_hook.name == hook.name:
        with hooked(model, hook, lambda act: replace(act, act)):
            yield
        return
    inputs: list[torch.Tensor] = []  # the input hook fires before the output hook in each forward pass
    with hooked(model, hook, lambda act: inputs.append(act) or None), \
            hooked(model, out_hook, lambda act: replace(inputs.pop(), act)):
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
        # Per position in the context: kept tokens, squared error, sum of x and of ||x||^2.
        self.pos_tokens = torch.zeros(0, dtype=torch.float64)
        self.pos_sq_err = torch.zeros(0, dtype=torch.float64)
        self.pos_x_sum = torch.zeros(0, d_in, dtype=torch.float64)
        self.pos_x_sq = torch.zeros(0, dtype=torch.float64)

    def add_downstream(self, clean: _NextTokenReference, with_sae: tuple[float, float],
                       zero: tuple[float, float]) -> None:
        self.ce["clean"] += clean.ce
        (ce_sae, kl_sae), (ce_zero, kl_zero) = with_sae, zero
        self.ce["sae"] += ce_sae
        self.ce["zero"] += ce_zero
        self.kl["sae"] += kl_sae
        self.kl["zero"] += kl_zero
        self.predictions += clean.predictions

    def grow_positions(self, seq: int) -> None:
        extra = seq - len(self.pos_tokens)
        if extra > 0:
            self.pos_tokens = torch.cat([self.pos_tokens, torch.zeros(extra, dtype=torch.float64)])
            self.pos_sq_err = torch.cat([self.pos_sq_err, torch.zeros(extra, dtype=torch.float64)])
            self.pos_x_sq = torch.cat([self.pos_x_sq, torch.zeros(extra, dtype=torch.float64)])
            self.pos_x_sum = torch.cat([self.pos_x_sum, torch.zeros(extra, self.pos_x_sum.shape[1],
                                                                    dtype=torch.float64)])


@torch.no_grad()
def evaluate(model, sae: SAE, hook: HookPoint | str | None, token_batches: Iterable[torch.Tensor],
             keep_mask: Callable[[torch.Tensor], torch.Tensor] | None = None, downstream: bool = True) -> dict:
    """Metrics of ``sae`` at ``hook`` over the given ``[batch, seq]`` token batches.

    ``hook``: a HookPoint, a name, or None for the SAE's metadata ``hook_name``. ``keep_mask(tokens)``
    gives the ``[batch, seq]`` positions to evaluate and splice at (None: all). ``downstream=False``
    skips the CE/KL metrics and runs the model only as far as the hook.

    Returns the scalar keys of ``METRIC_KEYS`` (the ce_*/kl_* ones only with ``downstream``), plus
    ``firing_frequency`` (a [d_sae] tensor) and ``error_by_position`` (plain lists, one entry per
    position in the context: ``tokens`` evaluated there, ``mse``, ``fvu`` = that position's squared
    error over its variance about the overall mean, ``fvu_contribution`` = its share of the overall
    FVU (these sum to ``fvu``); None where no token was evaluated).
    """
    return evaluate_many(model, [(sae, hook)], token_batches, keep_mask, downstream)[0]


class _Evaluated:
    """One dictionary under evaluation: the hooks it reads and writes (one and the same for an SAE, the output hook
    for a transcoder, several for a crosscoder), its totals, and a crosscoder's totals per hook."""

    def __init__(self, model, sae: SAE, hook: HookPoint | str | None, device):
        self.sae = sae.to(device)
        if sae.cfg.n_hooks > 1:
            names = sae.cfg.read_hooks if hook is None else split_hook_list(getattr(hook, "name", hook))
            if len(names) != sae.cfg.n_hooks:
                raise HookNameError(f"this {sae.cfg.kind} reads {sae.cfg.n_hooks} hook points; its metadata "
                                    f"hook_names (or the hook given, joined by +) must name them, got {names!r}")
            self.reads = [resolve_hook(model, name) for name in names]
        else:
            self.reads = [sae_hook(model, sae, hook)]
        self.writes = written_hooks(model, sae, self.reads)
        self.total = _Totals(sae.cfg.output_size, sae.cfg.d_sae)
        width = sae.cfg.output_hook_width
        self.by_hook = [_Totals(width, sae.cfg.d_sae) for _ in self.writes] if sae.cfg.n_hooks > 1 else []

    def rows(self, acts: dict[str, torch.Tensor], hooks: list[HookPoint]) -> torch.Tensor:
        return torch.cat([acts[hook.name] for hook in hooks], -1)

    def add_reconstruction(self, acts: dict[str, torch.Tensor], keep: torch.Tensor) -> None:
        inputs = self.rows(acts, self.reads)
        target = None if self.writes is self.reads else self.rows(acts, self.writes)
        x, x_hat, f = _add_reconstruction(self.total, self.sae, inputs, keep, target)
        positions = _positions(keep)
        width = self.sae.cfg.output_hook_width
        for totals, x_part, x_hat_part in zip(self.by_hook, x.split(width, -1), x_hat.split(width, -1)):
            _add_rows(totals, x_part, x_hat_part, f, positions)

    def replacements(self, acts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A crosscoder's (or CLT's) output at each hook from the clean activations of all it reads (a crosscoder's
        latents read later layers too, so they cannot be computed inside the forward pass that they change; a
        CLT is evaluated the same way, each output from clean inputs)."""
        inputs = self.rows(acts, self.reads).float()
        output = self.sae(inputs).split(self.sae.cfg.output_hook_width, -1)
        return {hook.name: part for hook, part in zip(self.writes, output)}


@torch.no_grad()
def evaluate_many(model, saes: Sequence[tuple[SAE, HookPoint | str | None]], token_batches: Iterable[torch.Tensor],
                  keep_mask: Callable[[torch.Tensor], torch.Tensor] | None = None, downstream: bool = True) -> list[dict]:
    """``evaluate`` for several ``(sae, hook)`` pairs on the same text, one result each (equal to evaluating
    that SAE alone). The model's clean pass runs once per batch and the zero-ablated pass once per distinct
    hook; only the spliced pass runs once per SAE (a sweep of 18 SAEs: 20 passes per batch, not 54).

    A crosscoder is spliced in at all its hooks together (``ce_loss_score`` etc.) and at each in turn, with its
    reconstruction computed from the clean activations; its result has ``by_hook``: FVU and CE/KL scores per hook.
    """
    device = next(model.parameters()).device
    evaluated = [_Evaluated(model, sae, hook, device) for sae, hook in saes]
    hooks = list({h.name: h for e in evaluated for h in (*e.reads, *e.writes)}.values())
    # What is zero-ablated: each dictionary's outputs together, and a crosscoder's one by one.
    ablated = list({tuple(h.name for h in group): group for e in evaluated
                    for group in (e.writes, *([h] for h in e.writes if len(e.writes) > 1))}.values())
    for tokens in token_batches:
        tokens = tokens.to(device)
        keep = (torch.ones_like(tokens, dtype=torch.bool) if keep_mask is None
                else keep_mask(tokens.cpu()).to(device))
        if not downstream:
            acts = capture(model, tokens, hooks)
            for e in evaluated:
                e.add_reconstruction(acts, keep)
            continue
        acts = {}
        with ExitStack() as stack:
            for hook in hooks:
                stack.enter_context(hooked(model, hook, lambda act, name=hook.name: acts.__setitem__(name, act.detach())))
            clean = _NextTokenReference(lm_logits(model, tokens), tokens, keep)
        zero = {}
        for group in ablated:
            with ExitStack() as stack:
                for hook in group:
                    stack.enter_context(zero_ablate(model, hook, keep))
                zero[tuple(h.name for h in group)] = clean.ce_and_kl(lm_logits(model, tokens))
        for e in evaluated:
            e.add_reconstruction(acts, keep)
            if not e.by_hook:
                with splice(model, e.sae, e.reads[0], keep):
                    e.total.add_downstream(clean, clean.ce_and_kl(lm_logits(model, tokens)), zero[(e.writes[0].name,)])
                continue
            new = e.replacements(acts)
            for totals, group in ((e.total, e.writes), *((t, [h]) for t, h in zip(e.by_hook, e.writes))):
                with _patched(model, {hook: new[hook.name] for hook in group}, keep):
                    with_sae = clean.ce_and_kl(lm_logits(model, tokens))
                totals.add_downstream(clean, with_sae, zero[tuple(h.name for h in group)])
    results = []
    for e in evaluated:
        result = _summarise(e.total, downstream)
        if e.by_hook:
            result["by_hook"] = {hook.name: {key: value for key, value in _summarise(t, downstream).items()
                                             if key in BY_HOOK_KEYS} for hook, t in zip(e.writes, e.by_hook)}
        if e.sae.cfg.cross_layer:  # a CLT's latents belong to the block they read: L0 per block sums to the total
            per_block = result["firing_frequency"].view(e.sae.cfg.n_hooks, -1).sum(1).tolist()
            for row, l0 in zip(result["by_hook"].values(), per_block):
                row["l0"] = l0
        results.append(result)
    return results


@contextmanager
def _patched(model, replacements: dict[HookPoint, torch.Tensor], keep: torch.Tensor):
    """Run with each hook's activation replaced by the given tensor at the kept positions."""
    def replace(new: torch.Tensor):
        return lambda act: torch.where(keep[..., None].to(act.device), new.to(act.dtype), act)

    with ExitStack() as stack:
        for hook, new in replacements.items():
            stack.enter_context(hooked(model, hook, replace(new)))
        yield


@torch.no_grad()
def evaluate_activations(sae: SAE, batches: Iterable[tuple[torch.Tensor, ...]]) -> dict:
    """The reconstruction metrics of ``evaluate`` (no CE/KL) over activations already computed, e.g. read
    from an activation cache: ``(act [batch, seq, d_in], keep [batch, seq])`` pairs, for a transcoder
    ``(act, keep, target [batch, seq, d_out])``."""
    totals = _Totals(sae.cfg.output_size, sae.cfg.d_sae)
    for act, keep, *target in batches:
        _add_reconstruction(totals, sae, act, keep, target[0] if target else None)
    return _summarise(totals, downstream=False)


def _add_reconstruction(totals: _Totals, sae: SAE, act: torch.Tensor, keep: torch.Tensor,
                        target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Add one batch: ``act`` what the dictionary reads, ``target`` what it should output (default ``act``);
    returns the kept rows of the target, of the reconstruction and of the latents."""
    inputs = act[keep].float()
    x = inputs if target is None else target[keep].float()
    f = sae.encode(inputs)
    x_hat = sae.reconstruction(inputs, f)
    _add_rows(totals, x, x_hat, f, _positions(keep))
    return x, x_hat, f


def _positions(keep: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Each kept row's position in its context, and the context length."""
    return torch.arange(keep.shape[1], device=keep.device).expand_as(keep)[keep].cpu(), keep.shape[1]


def _add_rows(totals: _Totals, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor,
              positions: tuple[torch.Tensor, int]) -> None:
    positions, seq = positions
    sq_err = (x - x_hat).double().pow(2).sum(-1)
    totals.tokens += len(x)
    totals.sums["l0"] += (f != 0).sum().item()
    totals.sums["l1"] += f.abs().sum().item()
    totals.sums["sq_err"] += sq_err.sum().item()
    totals.sums["cossim"] += F.cosine_similarity(x, x_hat, dim=-1).double().sum().item()
    totals.sums["l2_ratio"] += (x_hat.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)).double().sum().item()
    totals.x_sum += x.double().sum(0).cpu()
    totals.x_sq_sum += x.double().pow(2).sum(0).cpu()
    totals.fired += (f != 0).sum(0).double().cpu()

    totals.grow_positions(seq)
    xd = x.double().cpu()
    totals.pos_tokens.index_add_(0, positions, torch.ones(len(positions), dtype=torch.float64))
    totals.pos_sq_err.index_add_(0, positions, sq_err.cpu())
    totals.pos_x_sum.index_add_(0, positions, xd)
    totals.pos_x_sq.index_add_(0, positions, xd.pow(2).sum(-1))


class _NextTokenReference:
    """The clean model's next-token predictions for one batch, against which CE and KL are measured. Only
    predictions whose target is a position the SAE is applied to (not a special token) count."""

    def __init__(self, clean_logits: torch.Tensor, tokens: torch.Tensor, keep: torch.Tensor):
        self.targets, self.mask = tokens[:, 1:], keep[:, 1:]
        self.logp = F.log_softmax(clean_logits[:, :-1].float(), dim=-1)
        self.p = self.logp.exp()
        self.ce, _ = self.ce_and_kl(None)
        self.predictions = int(self.mask.sum().item())

    def ce_and_kl(self, logits: torch.Tensor | None) -> tuple[float, float]:
        """Summed cross-entropy of ``logits`` (None: the clean ones) and summed KL(clean || them)."""
        logp = self.logp if logits is None else F.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -logp.gather(-1, self.targets[..., None]).squeeze(-1)
        kl = 0.0 if logits is None else (self.p * (self.logp - logp)).sum(-1)[self.mask].double().sum().item()
        return nll[self.mask].double().sum().item(), kl


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
    result["error_by_position"] = _by_position(t, mean, total_variance)
    return result


def _by_position(t: _Totals, mean: torch.Tensor, total_variance: float) -> dict:
    """Per-position error as plain lists (JSON-ready); None where a position had no evaluated token."""
    counts = t.pos_tokens
    # sum over that position's tokens of ||x - mean||^2, with the overall per-dimension mean
    variance = t.pos_x_sq - 2 * (t.pos_x_sum @ mean) + counts * mean.pow(2).sum()
    d_in = len(mean)

    def listed(values: torch.Tensor) -> list:
        return [None if c == 0 or not math.isfinite(v) else v for c, v in zip(counts.tolist(), values.tolist())]

    safe = counts.clamp_min(1)
    return {
        "tokens": [int(c) for c in counts.tolist()],
        "mse": listed(t.pos_sq_err / (safe * d_in)),
        "fvu": listed(t.pos_sq_err / variance.clamp_min(1e-300)),
        "fvu_contribution": listed(t.pos_sq_err / total_variance if total_variance > 0
                                   else torch.full_like(counts, float("nan"))),
    }
