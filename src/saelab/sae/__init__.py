"""Sparse autoencoders: one file per architecture behind the interface in ``base.py``."""

from saelab.sae.base import SAE, SAEConfig, TrainOutput, TrainStepInfo
from saelab.sae.batchtopk import BatchTopKSAE
from saelab.sae.format import ARCHITECTURES, SAEFormatError, create_sae, load_sae, load_sparsity, save_sae
from saelab.sae.gated import GatedSAE
from saelab.sae.jumprelu import JumpReLUSAE, JumpReLUTrainingSAE
from saelab.sae.matryoshka import MatryoshkaBatchTopKSAE
from saelab.sae.standard import StandardSAE
from saelab.sae.topk import TopKSAE

__all__ = ["ARCHITECTURES", "SAE", "BatchTopKSAE", "GatedSAE", "JumpReLUSAE", "JumpReLUTrainingSAE",
           "MatryoshkaBatchTopKSAE", "SAEConfig", "SAEFormatError", "StandardSAE", "TopKSAE", "TrainOutput",
           "TrainStepInfo", "create_sae", "load_sae", "load_sparsity", "save_sae"]
