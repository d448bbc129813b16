"""Folders beyond this disk: activation caches and run folders at fsspec URLs (``s3://bucket/acts``,
``gs://...``, ``hf://datasets/...``, any protocol fsspec knows), so many machines can train from one cache
and a run survives the machine it started on.

saelab works in a local *staging* copy of such a folder (``$SAELAB_CACHE/staging/<hash of the URL>``) with
its usual atomic writes, and copies each file to the URL once it is complete: an object store's single
upload is atomic, so a reader there sees a file whole or not at all, as on a disk. Reading goes the other
way: ``ShardFetcher`` downloads the files a reader asks for, a few ahead of it (read-ahead, in background
threads), and forgets those it has passed, so a cache larger than this disk streams through.

Credentials and endpoints are fsspec's and the storage library's own (for S3: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` for an S3-compatible server, profiles, instance roles).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from saelab.files import write_json

# The package each protocol needs, for the error when it is missing.
PROTOCOL_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
                     "hf": "huggingface_hub"}


FETCHED_FILE = ".fetched.json"  # in a staging folder: the version of each file downloaded into it


def is_url(path) -> bool:
    """Whether ``path`` names a folder elsewhere (``scheme://...``); ``file://`` and plain paths are local."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def saelab_cache_dir() -> Path:
    """Where saelab keeps what it can fetch again: $SAELAB_CACHE, else $XDG_CACHE_HOME/saelab, else ~/.cache/saelab."""
    if os.environ.get("SAELAB_CACHE"):
        return Path(os.environ["SAELAB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "saelab"


def join(url: str, *parts: str) -> str:
    return "/".join([str(url).rstrip("/"), *parts])


class RemoteFolder:
    """A folder at an fsspec URL and its local staging copy (``local``)."""

    def __init__(self, url: str):
        self.url = str(url).rstrip("/")
        self.fs, self.root = _filesystem(self.url)
        name = hashlib.sha256(self.url.encode()).hexdigest()[:16]
        self.local = saelab_cache_dir() / "staging" / name
        self.local.mkdir(parents=True, exist_ok=True)
        self._reading_parent = saelab_cache_dir() / "read-ahead" / name
        self._reading: Path | None = None

    @property
    def reading(self) -> Path:
        """This process's own folder for files downloaded to be read (removed when the process is done with
        them): readers on one machine never delete each other's files."""
        if self._reading is None:
            self._reading_parent.mkdir(parents=True, exist_ok=True)
            self._reading = Path(tempfile.mkdtemp(dir=self._reading_parent))
            weakref.finalize(self, shutil.rmtree, self._reading, True)
        return self._reading

    def __repr__(self) -> str:
        return self.url

    def _remote(self, relative: str) -> str:
        return f"{self.root}/{relative}" if relative else self.root

    def exists(self, relative: str = "") -> bool:
        return self._call("read", relative, self.fs.exists, self._remote(relative))

    def files(self, under: str = "") -> dict[str, dict]:
        """Every file below ``under``: its relative path and what the store says of it (size, ETag, ...), from
        one listing."""
        base = self._remote(under)
        if not self._call("read", under, self.fs.exists, base):
            return {}
        found = self._call("list", under, self.fs.find, base, detail=True)
        return {str(path)[len(self.root) + 1:]: info for path, info in sorted(found.items())}

    def fetch(self, relative: str, local: Path | None = None) -> Path:
        """Download one file (to its place in the staging copy, unless ``local`` says where); its local path."""
        target = local or self.local / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.{threading.get_ident()}.part")
        self._call("read", relative, self.fs.get_file, self._remote(relative), str(partial))
        os.replace(partial, target)
        return target

    def pull(self, under: str = "", skip: Iterable[str] = ()) -> Path:
        """Make the staging copy of every file below ``under`` (but those below the folders in ``skip``) the
        URL's: a file already fetched is downloaded again only when it changed there; the staging copy."""
        skipped = tuple(f"{name.rstrip('/')}/" for name in skip)
        fetched = self._fetched()
        for relative, info in self.files(under).items():
            if relative.startswith(skipped):
                continue
            version = _version(info)
            if fetched.get(relative) != version or not (self.local / relative).exists():
                self.fetch(relative)
                fetched[relative] = version
        write_json(self.local / FETCHED_FILE, fetched)
        return self.local

    def clear_staging(self) -> None:
        """Empty the staging copy (a run starting afresh must not upload what an earlier one left there)."""
        shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True, exist_ok=True)

    def _fetched(self) -> dict:
        path = self.local / FETCHED_FILE
        try:
            return json.loads(path.read_text()) if path.exists() else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}

    def push(self, paths: Iterable[Path], remove: bool = False) -> None:
        """Upload files of the staging copy to their places at the URL (each upload whole or not at all);
        ``remove``: then delete the local copies (a cache's shards, once uploaded, need no local disk)."""
        for path in paths:
            path = Path(path)
            relative = path.relative_to(self.local).as_posix()
            self._call("write", relative, self.fs.put_file, str(path), self._remote(relative))
            if remove:
                path.unlink()

    def push_all(self, under: str = "") -> None:
        """Upload every file of the staging copy below ``under`` (temporary files left out)."""
        folder = self.local / under
        self.push(path for path in sorted(folder.rglob("*")) if path.is_file() and ".tmp" not in path.name
                  and path.name != FETCHED_FILE)

    def move(self, source: str, target: str) -> None:
        """Rename a file at the URL, if there (on an object store a copy made by the store itself: nothing
        crosses the network again)."""
        if self.exists(source):
            self._call("write", source, self.fs.mv, self._remote(source), self._remote(target))

    def remove(self, relative: str = "") -> None:
        """Delete a file or a folder at the URL, if there."""
        if self.exists(relative):
            self._call("write", relative, self.fs.rm, self._remote(relative), recursive=True)

    def _call(self, doing: str, relative: str, function, *args, **kwargs):
        try:
            return function(*args, **kwargs)
        except FileNotFoundError:
            raise FileNotFoundError(f"{join(self.url, relative)} does not exist") from None
        except Exception as err:  # the storage libraries raise their own kinds (botocore's, aiohttp's, ...)
            raise OSError(f"could not {doing} {join(self.url, relative)} ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200] if str(err) else 'no detail'}); check the URL, the "
                          "credentials and that the storage is reachable") from None


class ShardFetcher:
    """Local copies of a remote folder's files, for a reader that goes through them in order: asking for
    file ``i`` of a series starts downloading the next ``ahead`` of that series, and the files two or more
    behind the newest asked for are deleted (a memory map of one stays valid after its file is deleted)."""

    def __init__(self, folder: RemoteFolder, ahead: int = 2, workers: int = 4):
        self.folder, self.ahead = folder, ahead
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="saelab-fetch")
        self._pending: dict[str, Future] = {}          # file name -> its download
        self._held: dict[str, dict[int, str]] = {}     # series -> {index: file name} downloaded or under way
        self._lock = threading.Lock()
        self._download = folder.reading

    def path(self, series: str, index: int, name_of) -> Path:
        """The local copy of file ``name_of(index)`` of ``series`` (downloaded if need be, waiting for it)."""
        with self._lock:
            held = self._held.setdefault(series, {})
            for ahead in range(index, index + self.ahead + 1):
                name = name_of(ahead)
                if name not in self._pending:
                    self._pending[name] = self._pool.submit(self._get, name)
                    held[ahead] = name
            stale = [held.pop(i) for i in sorted(held) if i < index - 1]
            future = self._pending[name_of(index)]
        path = future.result()  # a download's error reaches the reader here
        for name in stale:
            self._forget(name)
        if path is None:
            raise FileNotFoundError(f"{join(self.folder.url, name_of(index))} does not exist")
        return path

    def _get(self, name: str) -> Path | None:
        try:
            return self.folder.fetch(name, self._download / name)
        except FileNotFoundError:  # read-ahead past the last file
            return None

    def _forget(self, name: str) -> None:
        with self._lock:
            future = self._pending.pop(name, None)
        if future is not None and future.done() and future.exception() is None and future.result() is not None:
            future.result().unlink(missing_ok=True)


def _version(info: dict) -> str:
    """What tells one version of a stored file from another: its size and the store's ETag or time stamp."""
    stamp = next((info[key] for key in ("ETag", "etag", "LastModified", "last_modified", "mtime", "created")
                  if key in info), "")
    return f"{info.get('size')}:{stamp}"


def _filesystem(url: str):
    try:
        import fsspec
    except ImportError:
        raise RuntimeError(f"{url}: folders at URLs need fsspec: pip install 'saelab[remote]'") from None
    protocol = url.split("://", 1)[0]
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError:
        package = PROTOCOL_PACKAGES.get(protocol, f"the fsspec implementation of {protocol}://")
        raise RuntimeError(f"{url}: {protocol}:// needs {package}: pip install {package}") from None
    except ValueError as err:
        raise ValueError(f"{url}: fsspec knows no such protocol ({err})") from None
