"""The files saelab writes and reads back: JSON and safetensors read so that a damaged file is a one-line
error naming the file, what is wrong with it and what to do (never a parser's traceback); JSON written
atomically; a folder held by one process at a time."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
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


def write_jsonl(path, rows) -> None:
    """Write ``rows`` as JSON lines (one object per line), atomically as ``write_json``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_jsonl(path, fix: str) -> list:
    """The objects of the JSON-lines file ``path``; ``fix`` as for ``read_json``."""
    path = Path(path)
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise FileFormatError(f"{path} line {number} is not valid JSON ({err.msg}): it was damaged or cut "
                                  f"short. {fix}") from None
    return rows


@contextmanager
def folder_lock(folder, what: str = "run"):
    """Hold ``folder`` (created if needed) for this process: a second saelab process writing the same folder
    is refused at once. The lock is the operating system's (flock on the folder), so a process that crashes
    or is killed leaves nothing stuck. Where flock does not exist (Windows) nothing is locked."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileExistsError(f"{folder} is being written by another saelab process (another {what} in the same "
                                  "folder): wait for it to finish, or choose another folder.") from None
        yield
    finally:
        os.close(fd)


@contextmanager
def writing(target, what: str, kept: str, leftovers=()):
    """Turn a failed write (a full disk, a lost mount, ...) into one line that names ``target``, says what
    went wrong and what is ``kept``; the partial files in ``leftovers`` are removed."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as err:
        for path in leftovers:
            Path(path).unlink(missing_ok=True)
        reason = getattr(err, "strerror", None) or str(err)
        raise OSError(f"could not write {what} {target} ({reason}); {kept}") from None
