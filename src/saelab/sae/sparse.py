"""Training kernels for TopK-family SAEs that touch only the k selected latents per token.

The encoder's forward product ``(x - b_dec) @ W_enc`` is dense (every pre-activation is needed to pick
the top k), but its backward is not: only k of d_sae pre-activations per token get a gradient. Autograd
would still run two dense ``[batch, d_sae]`` products for it (for ``W_enc`` and, through ``b_dec``, for
the input); here they become sparse products over the ``batch * k`` selected entries. Decoding gathers
k decoder rows instead of multiplying by a mostly-zero code matrix, and its backward is sparse too.
"""

from __future__ import annotations

import warnings

import torch


def _latent_major(indices: torch.Tensor, weights: torch.Tensor, d_sae: int) -> torch.Tensor:
    """The sparse ``[d_sae, batch]`` matrix with ``weights[b, j]`` at ``(indices[b, j], b)``."""
    batch, k = indices.shape
    tokens = torch.arange(batch, device=indices.device).repeat_interleave(k)
    return torch.sparse_coo_tensor(torch.stack([indices.reshape(-1), tokens]), weights.reshape(-1),
                                   (d_sae, batch), check_invariants=False)


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
        d_sae = W_enc.shape[1]
        grad_b_enc = torch.zeros(d_sae, dtype=grad_selected.dtype, device=grad_selected.device)
        grad_b_enc.index_add_(0, indices.reshape(-1), grad_selected.reshape(-1))
        grad_W_enc = torch.sparse.mm(_latent_major(indices, grad_selected, d_sae), sae_in).T
        # Through sae_in = x - b_dec: -sum over tokens of grad_pre @ W_enc.T, which is -W_enc @ grad_b_enc.
        grad_b_dec = -(W_enc @ grad_b_enc) if ctx.subtract_b_dec else None
        return None, grad_W_enc, grad_b_enc, grad_b_dec, None, None, None


class SparseDecode(torch.autograd.Function):
    """``sum_j values[:, j] * W_dec[indices[:, j]]`` with gradients for the selected rows only."""

    @staticmethod
    def forward(ctx, indices, values, W_dec):
        ctx.save_for_backward(indices, values, W_dec)
        return torch.nn.functional.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, grad_out):
        indices, values, W_dec = ctx.saved_tensors
        batch, k = indices.shape
        # grad_values[b, j] = W_dec[indices[b, j]] . grad_out[b]: a sampled dense-dense product.
        with warnings.catch_warnings():  # "CSR support is in beta": the one op used here is tested
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(torch.arange(0, batch * k + 1, k, device=indices.device),
                                              indices.reshape(-1), torch.zeros_like(values).reshape(-1),
                                              (batch, W_dec.shape[0]), check_invariants=False)
        grad_values = torch.sparse.sampled_addmm(pattern, grad_out, W_dec.T).values().view(batch, k)
        grad_W_dec = torch.sparse.mm(_latent_major(indices, values, W_dec.shape[0]), grad_out)
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


def sparse_decode(indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    return SparseDecode.apply(indices, values, W_dec)
