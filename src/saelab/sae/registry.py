"""The registry of SAE architectures: each architecture file declares one ``Architecture``; ``sae/__init__.py``
registers the built-in ones (one line each), user code its own with ``register_architecture``.

Everything the rest of saelab asks about an architecture is here, read from its declaration: its name and
aliases, the module it trains and the one a folder loads into, its training settings (a dataclass of its
own), which setting sets its sparsity and what a sweep tries by default, its dead-latent remedies. Nothing
outside ``saelab.sae`` compares architecture names. A new architecture (in saelab or in user code) is a
module class, a settings dataclass, its ``Architecture(...)`` and one ``register_architecture`` call.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass

from torch import nn

from saelab.options import check_fields
from saelab.sae.config import SAEConfig


# Dead-latent remedies every architecture takes: the trainer carries them out (resampling), or nothing.
GENERIC_REMEDIES = ("resample", "none")


@dataclass
class Settings:
    """Training settings of an architecture (subclassed by each). Its fields are ``saelab.options.option``
    fields: their help texts become ``saelab train`` options, shared by name with other architectures'
    settings (``k`` of topk, batchtopk and matryoshka_batchtopk is one option)."""

    def __post_init__(self):
        problems = check_fields(self)
        if problems:
            raise ValueError("; ".join(problems))

    def sae_config(self) -> dict:
        """The ``SAEConfig`` fields these settings fix (e.g. ``k``), written to the folder's cfg.json."""
        return {}


@dataclass(frozen=True)
class Architecture:
    name: str
    module: type[nn.Module]                       # what a folder of this architecture loads into
    settings: type[Settings] = Settings     # its training settings
    training_module: type[nn.Module] | None = None  # what the trainer optimises (default: module); export() converts
    summary: str = ""                       # one line for --architecture's help
    aliases: tuple[str, ...] = ()
    sparsity: str | None = None             # the settings field that sets how sparse it is (a sweep varies it)
    sweep_values: str = ""                  # what a sweep tries for it by default, comma-separated
    label: str = ""                         # prefix of the sparsity value in run names: k -> topk-k32
    remedies: tuple[str, ...] = ()          # dead-latent remedies it carries out itself (auxk, ghost_grads)
    default_remedy: str = "none"            # the remedy --dead-latent-remedy auto means for it
    loads_as: str | None = None             # a folder naming it loads as this architecture (batchtopk: jumprelu)
    in_default_sweep: bool = True           # `saelab sweep` without --architectures trains it

    @property
    def trains(self) -> type[nn.Module]:
        return self.training_module or self.module

    def accepts_remedy(self, remedy: str) -> bool:
        return remedy in ("auto", *GENERIC_REMEDIES, *self.remedies)

    def resolve_remedy(self, remedy: str) -> str:
        return self.default_remedy if remedy == "auto" else remedy

    def settings_from(self, values: dict) -> Settings:
        """Its settings from the values given by name; names of other architectures' settings are ignored."""
        own = {f.name for f in dataclasses.fields(self.settings)}
        return self.settings(**{name: value for name, value in values.items() if name in own})


_REGISTRY: dict[str, Architecture] = {}
_ALIASES: dict[str, str] = {}


def register_architecture(architecture: Architecture) -> Architecture:
    """Make ``architecture`` known to saelab by its name and aliases (training, loading, sweeps, the CLI)."""
    for name in (architecture.name, *architecture.aliases):
        known = _ALIASES.get(name)
        if known is not None and known != architecture.name:
            raise ValueError(f"architecture name {name!r} is taken by {known!r}")
    _REGISTRY[architecture.name] = architecture
    for name in (architecture.name, *architecture.aliases):
        _ALIASES[name] = architecture.name
    return architecture


def unregister_architecture(name: str) -> None:
    """Forget the architecture called ``name`` (and its aliases): for tests and plugins that register their own."""
    arch = architecture(name)
    del _REGISTRY[arch.name]
    for alias in [alias for alias, canonical in _ALIASES.items() if canonical == arch.name]:
        del _ALIASES[alias]


def architecture(name: str) -> Architecture:
    """The registered architecture called ``name`` (or one of its aliases); an unknown name lists the known."""
    canonical = _ALIASES.get(name)
    if canonical is None:
        close = difflib.get_close_matches(str(name), list(_ALIASES), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(f"unknown architecture {name!r}{hint}: architecture must be one of "
                         f"{', '.join(architecture_names())}")
    return _REGISTRY[canonical]


def architecture_names() -> list[str]:
    return list(_REGISTRY)


def all_architectures() -> list[Architecture]:
    return list(_REGISTRY.values())


def settings_fields() -> dict[str, tuple[dataclasses.Field, list[str]]]:
    """Every training-settings field of every registered architecture, by name: the field (its first
    declaration) and the architectures that take it."""
    found: dict[str, tuple[dataclasses.Field, list[str]]] = {}
    for arch in _REGISTRY.values():
        for f in dataclasses.fields(arch.settings):
            found.setdefault(f.name, (f, []))[1].append(arch.name)
    return found


def create_sae(cfg: SAEConfig, training: bool = False, settings: Settings | None = None) -> nn.Module:
    """The module for ``cfg.architecture``; ``training=True`` gives the one the trainer optimises, with
    ``settings`` (default: the architecture's defaults)."""
    arch = architecture(cfg.architecture)
    if not training:
        return arch.module(cfg)
    return arch.trains(cfg, settings if settings is not None else arch.settings())
