"""Reading the files saelab itself writes (JSON, safetensors), so that a damaged one is a one-line error that
names the file, what is wrong with it and what to do, never a parser's traceback."""

from __future__ import annotations

import json
import os
from pathlib import Path


class FileFormatError(ValueError):
    """A file is not what saelab expects there; the message names it, the fault and the fix."""


def read_json(path, fix: str):
    """The JSON in ``path``; ``fix`` says what to do when it cannot be read (truncated, not JSON, ...)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        what = "is empty" if not err.doc.strip() else f"is not valid JSON ({err.msg} at line {err.lineno})"
        raise FileFormatError(f"{path} {what}: it was damaged or cut short. {fix}") from None
    except UnicodeDecodeError:
        raise FileFormatError(f"{path} is not a text file. {fix}") from None


def read_safetensors(path, fix: str) -> dict:
    """The tensors in the safetensors file ``path``; ``fix`` as for ``read_json``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except SafetensorError as err:
        raise FileFormatError(f"{path} is not a readable safetensors file ({err}): it was damaged or cut short. "
                              f"{fix}") from None


def write_json(path, data) -> None:
    """Write ``data`` as JSON atomically: a reader (or a kill) sees the previous file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
