"""AbsTopK SAE ("AbsTopK: Rethinking Sparse Autoencoders for Bidirectional Features", arXiv 2510.00404;
SAELens ``abstopk``): the k pre-activations largest in magnitude are kept with their signs, so one latent can
fire in either direction (a feature and its opposite), where a TopK SAE would spend two latents. Everything else is TopK's: unit-norm decoder rows, AuxK (dead latents
picked by magnitude too) and the sparse training kernels (``signed`` selection)."""

from __future__ import annotations

from saelab.sae.registry import Architecture
from saelab.sae.topk import TopKSAE, TopKSettings


class AbsTopKSAE(TopKSAE):
    architecture = "abstopk"
    signed = True


ABSTOPK = Architecture(
    name="abstopk", module=AbsTopKSAE, settings=TopKSettings, sparsity="k", sweep_values="16,32,64", label="k",
    remedies=("auxk",), default_remedy="auxk", in_default_sweep=False,
    summary="the k largest pre-activations in magnitude, signs kept: latents fire both ways (arXiv 2510.00404)")
