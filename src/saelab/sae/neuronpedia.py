"""Links to Neuronpedia pages for SAEs and their features.

A Neuronpedia id names one SAE as "<model>/<sae set>", e.g. "gpt2-small/8-res-jb";
its page is https://www.neuronpedia.org/<id> and feature i's page is .../<id>/<i>.
"""

from __future__ import annotations

NEURONPEDIA_BASE_URL = "https://www.neuronpedia.org"


def neuronpedia_url(neuronpedia_id: str, feature: int | None = None) -> str:
    """URL of the SAE's Neuronpedia page, or of one feature's page when `feature` is given."""
    sae_path = neuronpedia_id.strip().strip("/")
    if not sae_path or "/" not in sae_path:
        raise ValueError(
            f"Neuronpedia id {neuronpedia_id!r} is not of the form '<model>/<sae set>' "
            "(e.g. 'gpt2-small/8-res-jb'); fix the SAE's neuronpedia_id metadata."
        )
    if feature is None:
        return f"{NEURONPEDIA_BASE_URL}/{sae_path}"
    if int(feature) < 0:
        raise ValueError(f"feature index must be >= 0, got {feature}")
    return f"{NEURONPEDIA_BASE_URL}/{sae_path}/{int(feature)}"
