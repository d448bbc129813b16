"""SAELens-style names mapped onto saelab's own: the training runner and its flat config (``saelens.py``) and
``HookedSAETransformer`` (``hooked_sae_transformer.py``, needs TransformerLens). All importable from ``saelab``."""

from saelab.compat.saelens import LanguageModelSAERunnerConfig, SAETrainingRunner

__all__ = ["LanguageModelSAERunnerConfig", "SAETrainingRunner"]
