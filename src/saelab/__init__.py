"""saelab: train, evaluate and read sparse autoencoders on language-model activations."""

__version__ = "0.1.0"

from saelab.evals import evaluate, splice  # noqa: E402
from saelab.models import load_model, resolve_hook  # noqa: E402
from saelab.sae import SAE, SAEConfig  # noqa: E402
from saelab.training import TrainConfig, Trainer  # noqa: E402


def train(cfg: TrainConfig | None = None, **overrides):
    """Train an SAE end to end (what ``saelab train`` does); returns a RunSummary."""
    from saelab.pipeline import train as run_pipeline

    return run_pipeline(cfg or TrainConfig(**overrides))


__all__ = ["SAE", "SAEConfig", "TrainConfig", "Trainer", "__version__", "evaluate", "load_model", "resolve_hook",
           "splice", "train"]
