"""Training kernels that touch only the non-zero codes.

The encoder's forward product ``(x - b_dec) @ W_enc`` is dense (every pre-activation is needed to decide which
latents fire), but its backward is not: only the pre-activations of latents that fire (and, for JumpReLU's
thresholds, those just below a threshold) get a gradient. Autograd would still run two dense ``[batch, d_sae]``
products for it (for ``W_enc`` and, through ``b_dec``, for the input); here they become sparse products over the
selected entries. Decoding gathers the selected decoder rows instead of multiplying by a mostly-zero code matrix,
and its backward is sparse too.

A ``Support`` lists the selected entries of a batch: TopK's are k per token, a thresholded architecture's
(JumpReLU, gated, standard) as many as pass its threshold. Those architectures choose the sparse path each step
from the fraction selected (``SPARSE_BELOW_DENSITY``): early in training, or with a weak penalty, their codes can
be dense, and dense products are then faster.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property

import torch

# The fraction of selected entries (of batch x d_sae) above which dense products are faster than the sparse kernels.
# Measured on 2 CPU cores (forward + backward, d_in 576, d_sae 18,432, batch 4096), sparse / dense step time at
# densities 0.2%, 1%, 3%, 5%, 8%: JumpReLU 0.18, 0.18, 0.38, 0.42, 0.65; standard 0.25, 0.35, 0.5, 0.67, -.
SPARSE_BELOW_DENSITY = 0.08


@dataclass(frozen=True)
class Support:
    """The selected entries of a ``[batch, d_sae]`` code matrix, row-major: entry i is ``(rows[i], latents[i])``,
    and row b's entries are ``row_starts[b]:row_starts[b + 1]`` (the compressed-row layout)."""

    rows: torch.Tensor
    latents: torch.Tensor
    row_starts: torch.Tensor
    d_sae: int

    @staticmethod
    def of_mask(mask: torch.Tensor) -> Support:
        rows, latents = mask.nonzero(as_tuple=True)
        return Support(rows, latents, _starts(rows, mask.shape[0]), mask.shape[1])

    @staticmethod
    def of_flat(flat: torch.Tensor, batch: int, d_sae: int) -> Support:
        """The entries at positions ``flat`` of the flattened ``[batch, d_sae]`` matrix (each at most once, any
        order): what a top-k over the whole batch gives, without building a mask only to find them again."""
        flat = flat.sort().values  # row-major, as of_mask lists them
        rows = flat.div(d_sae, rounding_mode="floor")
        return Support(rows, flat - rows * d_sae, _starts(rows, batch), d_sae)

    @staticmethod
    def of_indices(indices: torch.Tensor, d_sae: int) -> Support:
        """``indices`` ``[batch, k]``: k latents per row."""
        batch, k = indices.shape
        rows = torch.arange(batch, device=indices.device).repeat_interleave(k)
        return Support(rows, indices.reshape(-1), torch.arange(0, batch * k + 1, k, device=indices.device), d_sae)

    @property
    def batch(self) -> int:
        return len(self.row_starts) - 1

    @cached_property
    def _latent_order(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The entries sorted by latent: ``(order, row starts of the [d_sae, batch] layout, their tokens)``."""
        order = self.latents.argsort(stable=True)
        return order, _starts(self.latents, self.d_sae), self.rows[order]

    def latent_major(self, weights: torch.Tensor) -> torch.Tensor:
        """The sparse ``[d_sae, batch]`` matrix with ``weights[i]`` at ``(latents[i], rows[i])``, compressed by
        rows (its products with a dense matrix are 3x faster on CPU than a coordinate list's)."""
        order, row_starts, tokens = self._latent_order
        with warnings.catch_warnings():  # "CSR support is in beta": the ops used here are tested
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(row_starts, tokens, weights.reshape(-1)[order], (self.d_sae, self.batch),
                                           check_invariants=False)

    def fired(self, values: torch.Tensor) -> torch.Tensor:
        """Tokens on which each latent is non-zero, ``[d_sae]``."""
        return count_fired(self.latents, values, self.d_sae)


def _starts(groups: torch.Tensor, n: int) -> torch.Tensor:
    """``[n + 1]`` offsets of the compressed layout: where each of the ``n`` groups begins among the entries sorted by
    group (``groups``: each entry's), and the end."""
    counts = torch.bincount(groups, minlength=n)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def encoder_gradients(support: Support, grad_pre: torch.Tensor, sae_in: torch.Tensor, W_enc: torch.Tensor,
                      subtract_b_dec: bool):
    """``(grad W_enc, grad b_enc, grad b_dec or None)`` of ``pre = sae_in @ W_enc + b_enc`` (``sae_in = x - b_dec``
    when ``subtract_b_dec``) whose gradient is ``grad_pre`` at the ``support`` entries and 0 elsewhere."""
    grad_pre = grad_pre.reshape(-1).to(W_enc.dtype)  # under autocast the codes may be bf16; the weights are not
    grad_b_enc = torch.zeros(support.d_sae, dtype=grad_pre.dtype, device=grad_pre.device)
    grad_b_enc.index_add_(0, support.latents, grad_pre)
    grad_W_enc = torch.sparse.mm(support.latent_major(grad_pre), sae_in).T
    # Through sae_in = x - b_dec: -sum over tokens of grad_pre @ W_enc.T, which is -W_enc @ grad_b_enc.
    grad_b_dec = -(W_enc @ grad_b_enc) if subtract_b_dec else None
    return grad_W_enc, grad_b_enc, grad_b_dec


class TopKEncode(torch.autograd.Function):
    """``values, indices = topk((x - b_dec) @ W_enc + b_enc, k)``, values through ReLU; with ``signed``, the k
    largest in magnitude with their signs (AbsTopK)."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, k: int, subtract_b_dec: bool, signed: bool = False):
        sae_in = x - b_dec if subtract_b_dec else x
        pre = torch.addmm(b_enc, sae_in, W_enc)
        if signed:
            indices = pre.abs().topk(k, dim=-1, sorted=False).indices
            values = pre.gather(-1, indices)
        else:
            values, indices = pre.topk(k, dim=-1, sorted=False)
            values = values.relu()
        ctx.save_for_backward(sae_in, W_enc, indices, values)
        ctx.subtract_b_dec, ctx.signed = subtract_b_dec, signed
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, grad_values, _grad_indices):
        sae_in, W_enc, indices, values = ctx.saved_tensors
        grad_selected = grad_values if ctx.signed else grad_values * (values > 0)  # ReLU gate, [batch, k]
        support = Support.of_indices(indices, W_enc.shape[1])
        return None, *encoder_gradients(support, grad_selected, sae_in, W_enc, ctx.subtract_b_dec), None, None, None


class PreActivations(torch.autograd.Function):
    """The encoder's pre-activations ``pre`` (computed without a graph) given gradients to ``W_enc``, ``b_enc`` and
    ``b_dec``: at the ``support`` entries only (returned flat, in its order), or all of them when it is None."""

    @staticmethod
    def forward(ctx, pre, sae_in, W_enc, b_enc, b_dec, subtract_b_dec: bool, support: Support | None):
        ctx.save_for_backward(sae_in, W_enc)
        ctx.subtract_b_dec, ctx.support = subtract_b_dec, support
        return pre if support is None else pre[support.rows, support.latents]

    @staticmethod
    def backward(ctx, grad_pre):
        sae_in, W_enc = ctx.saved_tensors
        if ctx.support is not None:
            grads = encoder_gradients(ctx.support, grad_pre, sae_in, W_enc, ctx.subtract_b_dec)
        else:
            grad_pre = grad_pre.to(W_enc.dtype)  # bf16 under autocast
            grad_b_enc = grad_pre.sum(0)
            grads = (sae_in.T @ grad_pre, grad_b_enc, -(W_enc @ grad_b_enc) if ctx.subtract_b_dec else None)
        return None, None, *grads, None, None


def training_pre(x, W_enc, b_enc, b_dec, subtract_b_dec: bool, select, sparse_below: float = SPARSE_BELOW_DENSITY):
    """``(pre, support)``: the encoder's pre-activations for training. ``select(pre)`` gives the entries that get a
    gradient (the latents that fire, with any that a straight-through estimator reaches): a boolean mask, the sparse
    path taken when it keeps under ``sparse_below`` of the entries; or a ``Support``, always taken (a selection of
    fixed size, BatchTopK's). On the sparse path ``pre`` holds the selected entries only (flat, in ``support``'s
    order); otherwise all ``[batch, d_sae]`` of them and ``support`` is None."""
    with torch.no_grad():
        sae_in = x - b_dec if subtract_b_dec else x
        pre = torch.addmm(b_enc, sae_in, W_enc)
        chosen = select(pre) if sparse_below > 0 else None
        if chosen is None or isinstance(chosen, Support):
            support = chosen
        else:
            sparse = int(chosen.count_nonzero()) < sparse_below * chosen.numel()
            support = Support.of_mask(chosen) if sparse else None
    return PreActivations.apply(pre, sae_in, W_enc, b_enc, b_dec, subtract_b_dec, support), support


class SparseDecode(torch.autograd.Function):
    """``sum over a row's entries i of values[i] * W_dec[latents[i]]`` with gradients for the selected rows only."""

    @staticmethod
    def forward(ctx, support: Support, values, W_dec):
        values = values.to(W_dec.dtype)  # bf16 codes under autocast: the gather-sum runs in the decoder's dtype
        ctx.save_for_backward(values, W_dec)
        ctx.support = support
        return torch.nn.functional.embedding_bag(support.latents, W_dec, support.row_starts, mode="sum",
                                                 per_sample_weights=values, include_last_offset=True)

    @staticmethod
    def backward(ctx, grad_out):
        values, W_dec = ctx.saved_tensors
        support = ctx.support
        # grad_values[i] = W_dec[latents[i]] . grad_out[rows[i]]: a sampled dense-dense product.
        with warnings.catch_warnings():  # "CSR support is in beta": the one op used here is tested
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(support.row_starts, support.latents, torch.zeros_like(values),
                                              (support.batch, W_dec.shape[0]), check_invariants=False)
        grad_values = torch.sparse.sampled_addmm(pattern, grad_out, W_dec.T).values()
        grad_W_dec = torch.sparse.mm(support.latent_major(values), grad_out)
        return None, grad_values, grad_W_dec


def count_fired(indices: torch.Tensor, values: torch.Tensor, d_sae: int) -> torch.Tensor:
    """Tokens on which each latent is non-zero, ``[d_sae]``. A scatter-add: unlike ``bincount`` or boolean
    indexing it has a fixed output size, so on a GPU it does not wait for the device."""
    counts = torch.zeros(d_sae, dtype=torch.long, device=indices.device)
    return counts.index_add_(0, indices.reshape(-1), (values != 0).reshape(-1).long())


def topk_encode(x, W_enc, b_enc, b_dec, k: int, subtract_b_dec: bool = True, signed: bool = False):
    """Returns ``(values, indices)`` ([batch, k] each); gradients reach W_enc, b_enc and b_dec (not x). ``signed``:
    the k largest in magnitude, signs kept (AbsTopK)."""
    return TopKEncode.apply(x, W_enc, b_enc, b_dec, k, subtract_b_dec, signed)


def decode_support(support: Support, values: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """``[batch, d_out]``: the codes ``values`` (flat, at ``support``'s entries) times the decoder."""
    return SparseDecode.apply(support, values, W_dec)


def sparse_decode(indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """``decode_support`` of ``[batch, k]`` codes at ``[batch, k]`` latent indices."""
    return SparseDecode.apply(Support.of_indices(indices, W_dec.shape[0]), values.reshape(-1), W_dec)


# A thresholded architecture writes its training step once for both paths with these: ``support`` is what
# ``training_pre`` returned (None: the dense path, where the codes are ``[batch, d_sae]``).

def per_latent(values: torch.Tensor, support: Support | None) -> torch.Tensor:
    """A ``[d_sae]`` tensor lined up with the codes: itself (dense, it broadcasts over the batch), or its entry at
    each selected latent."""
    return values if support is None else values[support.latents]


def decode_codes(codes: torch.Tensor, W_dec: torch.Tensor, support: Support | None) -> torch.Tensor:
    return codes @ W_dec if support is None else decode_support(support, codes, W_dec)


def fired_codes(codes: torch.Tensor, support: Support | None) -> torch.Tensor:
    """Tokens on which each latent is non-zero, ``[d_sae]``."""
    return (codes != 0).sum(0) if support is None else support.fired(codes)
