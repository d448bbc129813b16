"""Data: text sources, tokenising and packing, activation sources and the shuffling buffer."""

from saelab.data.activations import ActivationBuffer, ActivationSource, LMActivationSource, TensorSource
from saelab.data.text import BUILTIN_CORPORA, DatasetError, iter_documents
from saelab.data.tokens import Packing, pack_contexts

__all__ = ["ActivationBuffer", "ActivationSource", "BUILTIN_CORPORA", "DatasetError", "LMActivationSource",
           "Packing", "TensorSource", "iter_documents", "pack_contexts"]
