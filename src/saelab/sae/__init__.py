"""Sparse autoencoders: one file per architecture behind the interface in ``base.py``, each registering its
``Architecture`` (``registry.py``); the SAELens folder format in ``format.py``. Knows nothing of language
models, data or training loops."""

from saelab.sae.base import SAE, TrainOutput, TrainStep
from saelab.sae.config import SAEConfig
from saelab.sae.format import SAEFormatError, load_sae, load_sparsity, save_sae
from saelab.sae.registry import (Architecture, Settings, all_architectures, architecture, architecture_names,
                                 create_sae, register_architecture, settings_fields, unregister_architecture)

# The architectures saelab ships, each declared in its own file; registered here in the order help texts and
# sweeps list them. Adding one: a file like topk.py, and one line here (or in your own code).
from saelab.sae.topk import TOPK, TopKSAE, TopKSettings  # noqa: E402
from saelab.sae.batchtopk import BATCHTOPK, BatchTopKSAE, BatchTopKSettings  # noqa: E402
from saelab.sae.matryoshka import MATRYOSHKA, MatryoshkaBatchTopKSAE, MatryoshkaSettings  # noqa: E402
from saelab.sae.jumprelu import JUMPRELU, JumpReLUSAE, JumpReLUSettings, JumpReLUTrainingSAE  # noqa: E402
from saelab.sae.gated import GATED, GatedSAE  # noqa: E402
from saelab.sae.standard import STANDARD, L1Settings, StandardSAE  # noqa: E402
from saelab.sae.abstopk import ABSTOPK, AbsTopKSAE  # noqa: E402
from saelab.sae.matching_pursuit import MATCHING_PURSUIT, MatchingPursuitSAE  # noqa: E402

register_architecture(TOPK)
register_architecture(BATCHTOPK)
register_architecture(MATRYOSHKA)
register_architecture(JUMPRELU)
register_architecture(GATED)
register_architecture(STANDARD)
register_architecture(ABSTOPK)
register_architecture(MATCHING_PURSUIT)
DEFAULT_ARCHITECTURE = TOPK.name  # what `saelab train` trains unless told otherwise

__all__ = ["DEFAULT_ARCHITECTURE", "SAE", "AbsTopKSAE", "Architecture", "BatchTopKSAE", "BatchTopKSettings", "GatedSAE", "JumpReLUSAE", "JumpReLUSettings",
           "JumpReLUTrainingSAE", "L1Settings", "MatchingPursuitSAE", "MatryoshkaBatchTopKSAE", "MatryoshkaSettings", "SAEConfig",
           "SAEFormatError", "Settings", "StandardSAE", "TopKSAE", "TopKSettings", "TrainOutput", "TrainStep",
           "all_architectures", "architecture", "architecture_names", "create_sae", "load_sae", "load_sparsity",
           "register_architecture", "save_sae", "settings_fields", "unregister_architecture"]
