"""Reading an SAE's features: per-token activations, top-activating examples, logit effects, steering and
logit attribution. One module per concern; none of them imports the command line."""

from saelab.analysis.attribution import Attribution, attribute, format_attribution
from saelab.analysis.dashboard import (DashboardCollector, DashboardConfig, batched_logit_effects, build_dashboard,
                                       parse_features)
from saelab.analysis.distributions import ActivationDistributions
from saelab.analysis.loading import Loaded, check_feature, load_sae_and_model, tokenize
from saelab.analysis.logits import (FinalNorm, LogitEffects, final_norm, format_logit_effects, logit_directions,
                                    logit_effects)
from saelab.analysis.steering import (SteeringResult, added_direction, clamped, format_steering, greedy_generate,
                                      steer)
from saelab.analysis.token_features import TokenFeatures, format_token_features, token_features
from saelab.analysis.top_examples import (Example, FeatureSummary, TopExamplesCollector, collect_from_batches,
                                          collect_top_examples)

__all__ = ["ActivationDistributions", "Attribution", "DashboardCollector", "DashboardConfig", "Example",
           "FeatureSummary", "FinalNorm", "Loaded", "LogitEffects", "SteeringResult", "TokenFeatures",
           "TopExamplesCollector", "added_direction", "attribute", "batched_logit_effects", "build_dashboard",
           "check_feature", "clamped", "collect_from_batches", "collect_top_examples", "final_norm",
           "format_attribution", "format_logit_effects", "format_steering", "format_token_features", "greedy_generate",
           "load_sae_and_model", "logit_directions", "logit_effects", "parse_features", "steer", "token_features",
           "tokenize"]
