"""Pretrained SAEs from the Hugging Face hub: a registry of well-known releases, and any hub repo laid out
in the SAELens folder format.

A release names a hub repo; an SAE id names one SAE in it. ``pretrained.json`` (next to this file) lists
the well-known releases (repo ids, folder paths and Neuronpedia ids as published with them). Any other
``release="owner/repo"`` is read as a repo of SAELens folders, ``sae_id`` being the folder. Files come
through ``huggingface_hub`` into its cache (``HF_HUB_CACHE``, else ``$HF_HOME/hub``); with
``HF_HUB_OFFLINE=1`` only that cache is read.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
import torch
from torch import nn

from saelab.files import read_json
from saelab.sae.config import SAEConfig
from saelab.sae.format import CONFIG_FILE, WEIGHTS_FILE, SAEFormatError, config_to_json, load_sae, load_sparsity
from saelab.sae.registry import create_sae


REGISTRY_FILE = Path(__file__).with_name("pretrained.json")
GEMMA_SCOPE_FILE = "params.npz"
# What each registry format needs in an SAE's folder.
REQUIRED_FILES = {"saelens": (CONFIG_FILE, WEIGHTS_FILE), "gemma_scope": (GEMMA_SCOPE_FILE,)}
# Gemma Scope folders say their width rounded to thousands: width_16k is 2**14 latents, width_1m 2**20.
WIDTH_UNITS = {"k": 1_000, "m": 1_000_000}
# Gemma Scope's published training setup (its SAELens configs say the same).
GEMMA_SCOPE_METADATA = {"context_size": 1024, "prepend_bos": True, "dataset_path": "monology/pile-uncopyrighted"}


class PretrainedError(ValueError):
    pass


@dataclass(frozen=True)
class PretrainedRef:
    """Where one pretrained SAE lives and what is known about it before downloading."""

    release: str
    sae_id: str
    repo_id: str
    path: str                       # the SAE's folder inside the repo
    format: str                     # "saelens" or "gemma_scope"
    model: str | None = None
    hook: str | None = None
    d_in: int | None = None
    d_sae: int | None = None
    neuronpedia_id: str | None = None
    l0: float | None = None

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(f"{self.path}/{name}" for name in REQUIRED_FILES[self.format])


def registry() -> dict[str, dict]:
    """The well-known releases, by name (read from ``pretrained.json``)."""
    return json.loads(REGISTRY_FILE.read_text())


def is_repo_id(release: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", release) is not None


def resolve(release: str, sae_id: str) -> PretrainedRef:
    """The SAE ``sae_id`` of ``release`` (a registry name or a hub repo id of SAELens folders)."""
    releases = registry()
    if release in releases:
        return _registry_ref(release, releases[release], sae_id)
    if is_repo_id(release):
        return PretrainedRef(release, sae_id, repo_id=release, path=sae_id.strip("/"), format="saelens",
                             hook=_hook_named_by(sae_id))
    raise PretrainedError(f"unknown release {release!r}: not in saelab's registry (`saelab pretrained list`) and not "
                          "a hub repo id (owner/repo). For an SAE folder on disk use SAE.load(folder).")


def release_refs(release: str) -> list[PretrainedRef]:
    """Every SAE the registry lists for ``release`` (open-ended releases may hold more)."""
    entry = registry().get(release)
    if entry is None:
        raise PretrainedError(f"release {release!r} is not in saelab's registry; `saelab pretrained list` shows them")
    return [_registry_ref(release, entry, sae_id) for sae_id in entry["saes"]]


def _registry_ref(release: str, entry: dict, sae_id: str) -> PretrainedRef:
    known = entry["saes"].get(sae_id)
    if known is None and not entry.get("any_folder"):
        shown = ", ".join(list(entry["saes"])[:8])
        raise PretrainedError(f"release {release!r} has no SAE {sae_id!r}. Its SAEs: {shown}"
                              f"{' ...' if len(entry['saes']) > 8 else ''} (`saelab pretrained show {release}`)")
    known = known or {}
    path = known.get("path", sae_id).strip("/")
    return PretrainedRef(release, sae_id, repo_id=entry["repo_id"], path=path, format=entry["format"],
                         model=entry.get("model"), hook=_hook_of(entry, sae_id, path), d_in=entry.get("d_in"),
                         d_sae=entry.get("d_sae") or _width_of(path), neuronpedia_id=known.get("neuronpedia"),
                         l0=known.get("l0"))


def _hook_of(entry: dict, sae_id: str, path: str) -> str | None:
    template = entry.get("hook_template")
    if template:
        layer = re.search(r"layer_(\d+)", path)
        return template.format(layer=layer.group(1)) if layer else None
    return _hook_named_by(sae_id)


def _hook_named_by(sae_id: str) -> str | None:
    """``sae_id`` itself when it has the shape of a TransformerLens hook name, ``blocks.L.hook_...`` (SAELens-style
    releases name each SAE by its hook). The shape only: which hook kinds a model has is saelab.models' business."""
    return sae_id if re.fullmatch(r"blocks\.\d+\.(\w+\.)?hook_\w+", sae_id) else None


def _width_of(path: str) -> int | None:
    match = re.search(r"width_(\d+)([km])\b", path)
    return 2 ** round(math.log2(int(match.group(1)) * WIDTH_UNITS[match.group(2)])) if match else None


# --- the hub cache -------------------------------------------------------------------------------------
def hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now: huggingface_hub reads it once at import, a later setting would be missed."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "on", "yes", "true"}


def hub_cache_dir() -> Path:
    """The hub cache huggingface_hub uses, read from the environment now (for the same reason)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def cached_folder(ref: PretrainedRef) -> Path | None:
    """The SAE's folder in the local hub cache when every file it needs is there; never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    found = [try_to_load_from_cache(ref.repo_id, name, cache_dir=hub_cache_dir()) for name in ref.files]
    if all(isinstance(path, str) for path in found):
        return Path(found[0]).parent
    return None


def download(ref: PretrainedRef) -> Path:
    """The SAE's folder, from the hub cache or downloaded into it (only that folder of the repo)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = hub_offline()
    try:
        snapshot = snapshot_download(ref.repo_id, allow_patterns=[f"{ref.path}/*"], cache_dir=hub_cache_dir(),
                                     local_files_only=offline)
    except LocalEntryNotFoundError:
        raise PretrainedError(_not_cached_message(ref, offline)) from None
    except HfHubHTTPError as err:
        raise PretrainedError(f"the hub refused {ref.repo_id!r} ({err}); check the release name, or log in "
                              "(`hf auth login`) if the repo is gated") from None
    folder = Path(snapshot) / ref.path
    missing = [name for name in REQUIRED_FILES[ref.format] if not (folder / name).is_file()]
    if missing and offline:
        raise PretrainedError(_not_cached_message(ref, offline))
    if missing:
        raise PretrainedError(f"{ref.repo_id} has no {', '.join(missing)} in folder {ref.path!r}: SAE id "
                              f"{ref.sae_id!r} does not name an SAE folder of release {ref.release!r}")
    return folder


def _not_cached_message(ref: PretrainedRef, offline: bool) -> str:
    why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
    return (f"cannot load SAE {ref.sae_id!r} of release {ref.release!r}: {why} and the Hugging Face cache "
            f"{hub_cache_dir()} does not hold {', '.join(ref.files)} of {ref.repo_id}. Connect to the internet "
            f"(and unset HF_HUB_OFFLINE) to download them, or set HF_HOME / HF_HUB_CACHE to a cache that holds "
            f"them, or download the folder {ref.path!r} yourself and load it with SAE.load(folder).")


# --- loading --------------------------------------------------------------------------------------------
def from_pretrained(release: str, sae_id: str, device: str | torch.device = "cpu"
                    ) -> tuple[nn.Module, dict, torch.Tensor | None]:
    """``(sae, cfg_dict, log10 sparsity or None)`` for an SAE of a release, as SAELens's ``from_pretrained``.

    ``release``: a registry name (``saelab pretrained list``), a hub repo id of SAELens folders, or a local
    folder holding SAE folders. ``cfg_dict`` is the SAE's config with its metadata keys at the top level.
    """
    if Path(release).expanduser().is_dir():
        folder = Path(release).expanduser() / sae_id
        sae, sparsity = load_sae(folder, device=device), load_sparsity(folder)
        return sae, flat_config(sae.cfg), sparsity
    ref = resolve(release, sae_id)
    folder = download(ref)
    if ref.format == "gemma_scope":
        sae, sparsity = load_gemma_scope(folder, ref).to(device), None
    else:
        sae, sparsity = load_sae(folder, device=device), load_sparsity(folder)
    meta = sae.cfg.metadata
    for key, value in (("neuronpedia_id", ref.neuronpedia_id), ("model_name", ref.model), ("hook_name", ref.hook)):
        if value and not meta.get(key):
            meta[key] = value
    meta.update(pretrained_release=ref.release, pretrained_sae_id=ref.sae_id, pretrained_repo_id=ref.repo_id)
    return sae, flat_config(sae.cfg), sparsity


def load_gemma_scope(folder: Path, ref: PretrainedRef) -> nn.Module:
    """A Gemma Scope ``params.npz`` (W_enc, W_dec, b_enc, b_dec, threshold) as a JumpReLU SAE.

    Gemma Scope encodes ``x @ W_enc + b_enc`` without subtracting ``b_dec`` first.
    """
    import numpy as np

    with np.load(folder / GEMMA_SCOPE_FILE, allow_pickle=False) as params:
        tensors = {name: torch.from_numpy(params[name]).float() for name in params.files}
    needed = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
    missing = [name for name in needed if name not in tensors]
    if missing:
        raise SAEFormatError(f"{folder / GEMMA_SCOPE_FILE} lacks {', '.join(missing)}: not a Gemma Scope SAE")
    d_in, d_sae = tensors["W_enc"].shape
    metadata = {**GEMMA_SCOPE_METADATA, "model_name": ref.model, "hook_name": ref.hook,
                "neuronpedia_id": ref.neuronpedia_id}
    sae = create_sae(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="jumprelu", apply_b_dec_to_input=False,
                               metadata=metadata))
    sae.load_state_dict({name: tensors[name] for name in needed})
    return sae.eval()


def flat_config(cfg: SAEConfig) -> dict:
    """The SAE's cfg.json with its metadata keys at the top level (what SAELens hands back as cfg_dict)."""
    raw = config_to_json(cfg)
    metadata = raw.pop("metadata")
    return {**metadata, **raw}


# --- tables for `saelab pretrained` -----------------------------------------------------------------------
SAE_COLUMNS = ("release", "sae_id", "repo", "model", "hook", "d_sae", "neuronpedia_id")


def sae_row(ref: PretrainedRef) -> dict:
    """One SAE's table row; hook and d_sae come from its cached cfg.json when the registry does not say them."""
    hook, d_sae = ref.hook, ref.d_sae
    folder = cached_folder(ref) if ref.format == "saelens" and (hook is None or d_sae is None) else None
    if folder is not None:
        raw = read_json(folder / CONFIG_FILE, "Delete that folder from the hub cache and download it again.")
        meta = raw.get("metadata") or raw
        hook = hook or meta.get("hook_name") or meta.get("hook_point")
        d_sae = d_sae or raw.get("d_sae")
    return {"release": ref.release, "sae_id": ref.sae_id, "repo": ref.repo_id, "model": ref.model or "?",
            "hook": hook or "?", "d_sae": d_sae or "?", "neuronpedia_id": ref.neuronpedia_id or "-"}


def format_rows(rows: list[dict], columns: tuple[str, ...]) -> str:
    """A plain-text table: a header, a rule, one line per row, columns padded to their widest cell."""
    cells = [[str(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def format_releases() -> str:
    """Every release in the registry: its repo, model and how many SAEs it lists."""
    rows = []
    for name, entry in registry().items():
        listed = f"{len(entry['saes'])}" if entry["saes"] else "-"
        rows.append({"release": name, "repo": entry["repo_id"], "model": entry.get("model", "?"),
                     "saes": listed + (" + any folder" if entry.get("any_folder") else ""),
                     "format": entry["format"]})
    return (format_rows(rows, ("release", "repo", "model", "saes", "format")) +
            "\n\nAny other hub repo of SAELens folders loads too: SAE.from_pretrained(\"owner/repo\", \"folder\").")


def format_release(release: str) -> str:
    """A release's SAEs, one row each."""
    entry = registry().get(release)
    if entry is None:
        if is_repo_id(release):
            return (f"{release} is not in the registry; as a hub repo of SAELens folders each folder is an SAE "
                    f"id: SAE.from_pretrained({release!r}, \"<folder>\")")
        raise PretrainedError(f"release {release!r} is not in saelab's registry; `saelab pretrained list` shows them")
    header = [f"release {release}: {entry['repo_id']} ({entry.get('model', '?')}, {entry['format']} format)",
              f"  hub: https://huggingface.co/{entry['repo_id']}"]
    if entry.get("dashboards"):
        header.append(f"  Neuronpedia: {entry['dashboards']}")
    if entry.get("any_folder"):
        header.append("  any folder of the repo is an SAE id (layer_L/width_W/average_l0_X)")
    refs = release_refs(release)
    body = format_rows([sae_row(ref) for ref in refs], SAE_COLUMNS) if refs else "(no SAEs listed)"
    return "\n".join(header) + "\n\n" + body


def format_sae(release: str, sae_id: str, link=None) -> str:
    """Everything known about one SAE before loading it and its cache state; ``link(neuronpedia_id)`` gives
    the URL shown for its Neuronpedia id (the command line passes ``neuronpedia_url``)."""
    ref = resolve(release, sae_id)
    row = sae_row(ref)
    folder = cached_folder(ref)
    lines = [format_rows([row], SAE_COLUMNS), "",
             f"folder:      {ref.repo_id}/{ref.path} ({', '.join(REQUIRED_FILES[ref.format])})",
             f"cached:      {folder if folder else 'no (downloaded on first load)'}"]
    if ref.neuronpedia_id:
        lines.append(f"neuronpedia: {link(ref.neuronpedia_id) if link else ref.neuronpedia_id}")
    if ref.l0 is not None:
        lines.append(f"l0:          {ref.l0:g} (as published)")
    lines.append(f"load:        SAE.from_pretrained({release!r}, {sae_id!r})")
    return "\n".join(lines)
