"""Config fields with their facts attached: help text (the ``--help`` entry) and what role the field plays.

Every config in saelab is a dataclass whose fields are made by ``option``. What a field *means* to the rest
of the package is declared here, on the field, and read back with ``fields_with``; nothing keeps a list of
field names of its own:

- ``per_sae``: may take several values in one run (``--k 16,32``: one dictionary per combination);
- ``shared``: every dictionary trained in one run must have the same value (they read one stream of batches);
- ``cached``: fixed by an activation cache (training on a cache takes it from the cache's metadata);
- ``fixed_on_resume``: a resumed run must have the value it started with;
- ``runtime``: where or how visibly the work runs (device, progress bars, output folder), not what it computes;
- ``label``: how the value shows in a run folder's name when a run lists several (``x{}`` -> ``x16``);
- ``positive``: must be > 0 (checked by ``check_fields``); ``choices``: the allowed values;
- ``positional``: a positional command-line argument (``metavar`` names it); ``aliases``: extra flags;
  ``nargs``: several values after one flag (a ``list[...]`` field); ``exclusive``: options of one group name
  exclude each other;
  ``replaces``: a command that combines two configs (sweep: SweepConfig + TrainConfig) offers this field
  instead of the other config's fields of those names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, field

def option(default, help, *, choices=None, positive: bool = False, per_sae: bool = False,
           shared: bool = False, cached: bool = False, fixed_on_resume: bool = False, positional: bool = False,
           metavar: str | None = None, aliases: tuple[str, ...] = (), replaces: tuple[str, ...] = (),
           label: str | None = None, runtime: bool = False, nargs: str | None = None, exclusive: str | None = None):
    """A config field with its help text and roles (see the module docstring). ``help`` is a string, or a
    function giving it when asked (for text read from a registry that grows). ``default`` may be MISSING (a
    required field), or ``dict`` / ``list`` for a fresh empty one each time."""
    metadata = {"help": help, "choices": tuple(choices) if choices else None, "positive": positive,
                "per_sae": per_sae, "shared": shared, "cached": cached, "fixed_on_resume": fixed_on_resume,
                "positional": positional, "metavar": metavar, "aliases": tuple(aliases), "replaces": tuple(replaces),
                "label": label, "runtime": runtime, "nargs": nargs, "exclusive": exclusive}
    if default in (dict, list):
        return field(default_factory=default, metadata=metadata)
    if default is MISSING:
        return field(metadata=metadata)
    return field(default=default, metadata=metadata)


def fields_with(config_class, role: str) -> tuple[str, ...]:
    """The names of ``config_class``'s fields that have ``role`` (one of those in the module docstring)."""
    return tuple(f.name for f in dataclasses.fields(config_class) if f.metadata.get(role))


def help_text(f: dataclasses.Field) -> str:
    text = f.metadata.get("help", "")
    return text() if callable(text) else text


def type_name(f: dataclasses.Field) -> str:
    """``int``, ``float``, ``str`` or ``bool``: the field's type without ``| None`` (of a ``list[...]``, its items')."""
    name = str(f.type).replace(" | None", "").replace("None | ", "").strip()
    return name[5:-1] if name.startswith("list[") else name


def default_of(f: dataclasses.Field):
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def check_fields(cfg) -> list[str]:
    """What is wrong with ``cfg`` by its fields' declarations (positive, choices), one sentence each."""
    problems = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.metadata.get("positive") and value is not None and not value > 0:
            problems.append(f"{f.name} must be positive (got {value})")
        allowed = f.metadata.get("choices")
        if allowed and value is not None and value not in allowed:
            problems.append(f"{f.name} must be one of {', '.join(map(str, allowed))} (got {value!r})")
    return problems


def parse_list(text: str, kind=str) -> list:
    """``"16,32"`` -> ``[16, 32]`` (``kind`` converts each item; underscores allowed in numbers)."""
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    if not items:
        raise ValueError(f"no value in {text!r}")
    try:
        return [item if kind is str else kind(item.replace("_", "")) for item in items]
    except ValueError:
        raise ValueError(f"cannot read {text!r} as comma-separated {kind.__name__} values") from None
