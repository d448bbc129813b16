"""Data: text sources, tokenising and packing, activation sources (a model over text, or an on-disk cache),
the shuffling buffer, and the data of a training run (``TrainingData``)."""

from saelab.data.activations import (ActivationBuffer, ActivationSource, LMActivationSource, TensorSource,
                                     text_activations)
from saelab.data.options import DataOptions, TextOptions
from saelab.data.sources import HeldOut, TrainingData, sae_metadata
from saelab.data.text import BUILTIN_CORPORA, DatasetError, iter_documents
from saelab.data.tokens import Packing, pack_contexts

__all__ = ["ActivationBuffer", "ActivationSource", "BUILTIN_CORPORA", "DataOptions", "DatasetError", "HeldOut",
           "LMActivationSource", "Packing", "TensorSource", "TextOptions", "TrainingData", "iter_documents",
           "pack_contexts", "sae_metadata", "text_activations"]
