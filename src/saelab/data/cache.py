"""The on-disk activation cache: a model's activations at several hook points, written once by one forward
pass per batch, then read by any number of training runs without the model.

A cache folder::

    metadata.json                    what was cached and how; the shards finished so far
    tokens/shard_00000.npy           int32 [contexts, context_size]: the token ids of each context
    keep/shard_00000.npy             bool  [contexts, context_size]: the positions that have an activation row
    hooks/<hook>/shard_00000.npy     [rows, d_in]: one row per kept position, in (context, position) order

Activations are plain ``.npy`` files read through numpy's memory map, so a reader holds only the rows it
asks for: float32 and float16 as themselves, bfloat16 (which numpy lacks) as its raw 16 bits in a uint16
array. Only kept positions are stored (BOS/EOS/pad are left out by default, as in training), so a shard's
rows are exactly what ``LMActivationSource`` yields for its contexts.

A shard holds a whole number of forward batches (``lm_batch_size`` contexts) and a training *unit* is one
such batch, the unit ``LMActivationSource`` yields: a run on the cache sees the same rows in the same
order as a run on the model. Every file is written under a temporary name and renamed. While a cache is
written, each finished shard is recorded in ``progress/shard_NNNNN.json`` (several processes under torchrun
write shards in turn) and metadata.json lists the finished shards without a gap from the first, so an
interrupted write continues where it stopped; the complete cache's metadata.json lists every shard, and
progress/ is removed.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from saelab.data.activations import LMActivationSource, ShardableSource, text_activations
from saelab.data.options import TextOptions
from saelab.data.text import describe_source
from saelab.distributed import DataParallel, data_parallel_from_env
from saelab.files import folder_lock, read_json, write_json, writing
from saelab.log import say
from saelab.storage import FETCHED_FILE, RemoteFolder, ShardFetcher, is_url
from saelab.models.hooks import HookPoint, capture
from saelab.models.options import ModelOptions
from saelab.options import check_fields, default_of, fields_with, option
from saelab.version import __version__

FORMAT = "saelab-activation-cache"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
# Storage of each --dtype: the numpy dtype of the .npy file and the torch dtype it holds.
DTYPES = {"float32": (np.float32, torch.float32), "float16": (np.float16, torch.float16),
          "bfloat16": (np.uint16, torch.bfloat16)}


@dataclass
class CacheConfig(ModelOptions, TextOptions):
    """The model, text and packing options are those of ``saelab train`` (one declaration, data/options.py),
    so a cache holds exactly the rows a training run on the model would read."""

    hooks: str = option("blocks.6.hook_resid_post", "Hook points to cache, comma-separated (TransformerLens-style "
                        "names or module paths); all are read in one forward pass per batch that stops after "
                        "the deepest.")
    tokens: int = option(1_200_000, "Tokens of text to cache, rounded up to whole contexts (fewer when the text "
                         "ends first). Disk: tokens x d_in x 4 bytes per hook (2 for float16, bfloat16).",
                         positive=True)
    dtype: str | None = option(None, "Storage type of the activations: float32, float16 or bfloat16 (default: "
                               "float32 on CPU, bfloat16 on CUDA where the model runs in bf16).",
                               choices=tuple(DTYPES))
    shard_tokens: int = option(65_536, "Tokens per shard file, rounded to whole forward batches: the unit "
                               "an interrupted write resumes from.", positive=True)
    out: str = option("acts", "Cache folder: metadata.json, tokens/, keep/ and hooks/<hook>/ shards. Running "
                      "the same command again continues an interrupted write.", runtime=True)
    progress: bool = option(True, "Show a progress bar (tokens/s, ETA).", runtime=True)

    def __post_init__(self):
        problems = check_fields(self)
        if not self.hook_names:
            problems.append("hooks lists no hook point")
        if problems:
            raise ValueError("invalid cache config: " + "; ".join(problems))

    @property
    def hook_names(self) -> list[str]:
        return list(dict.fromkeys(name.strip() for name in self.hooks.split(",") if name.strip()))

    @property
    def contexts(self) -> int:
        return math.ceil(self.tokens / self.context_size)

    @property
    def batches_per_shard(self) -> int:
        return max(1, round(self.shard_tokens / (self.context_size * self.lm_batch_size)))


# --- writing -------------------------------------------------------------------------------------------
def write_cache(cfg: CacheConfig, overwrite: bool = False, data_parallel: DataParallel | None = None) -> Path:
    """Write (or continue writing) the cache ``cfg`` describes; returns its folder.

    Under torchrun (``torchrun --nproc_per_node N -m saelab cache ...``) rank r writes shards r, r + N, ...,
    each running the model on its own contexts: the cache is the one a single process writes, in 1/N of the
    time. Rank 0 holds the folder's lock, writes metadata.json and completes the cache.
    """
    dp = data_parallel or data_parallel_from_env(cfg.device)
    # At a URL: written in a local staging folder, each shard uploaded once complete (storage.py).
    remote = RemoteFolder(cfg.out) if is_url(cfg.out) else None
    out = remote.local if remote else Path(cfg.out)
    with folder_lock(out, "cache") if dp.is_main else nullcontext():
        _write_cache(cfg, out, remote, overwrite, dp)
    return out if remote is None else cfg.out


def _write_cache(cfg: CacheConfig, out: Path, remote: RemoteFolder | None, overwrite: bool, dp: DataParallel) -> None:
    from saelab.models import load_model, resolve_hook
    from saelab.models.loading import default_device

    device = torch.device(dp.device or cfg.device) if (dp.device or cfg.device) else default_device()
    cfg = replace(cfg, dtype=cfg.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if remote and dp.is_main:  # the staging folder starts as the URL's metadata and progress records
        if overwrite:
            remote.remove()
        remote.clear_staging()
        remote.pull(skip=("tokens", "keep", "hooks"))
    metadata = _existing_metadata(out, cfg, overwrite) if dp.is_main else None
    dp.barrier()  # rank 0 has checked the folder (and cleared it for --overwrite)
    if not dp.is_main and (out / METADATA_FILE).exists():
        metadata = _existing_metadata(out, cfg, overwrite=False)
    if metadata is not None and metadata["complete"]:
        if dp.is_main:
            shutil.rmtree(out / PROGRESS_FOLDER, ignore_errors=True)  # left by a kill just after completing
            say(f"{cfg.out} already holds this cache, complete ({metadata['tokens']:,} tokens); nothing to do")
        return
    model, tokenizer = load_model(cfg.model, device)
    hooks = [resolve_hook(model, name) for name in cfg.hook_names]
    # The training source's own token stream, keep mask and hook widths: the cache packs text exactly as
    # training does.
    reader = text_activations(model, tokenizer, hooks, cfg, max_contexts=cfg.contexts)
    if metadata is None and dp.is_main:
        widths = {name: columns.stop - columns.start for name, columns in reader.columns.items()}
        metadata = _new_metadata(cfg, tokenizer, hooks, widths)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / METADATA_FILE, metadata)
        if remote:
            remote.push([out / METADATA_FILE])
    dp.barrier()  # metadata.json exists
    if not dp.is_main:
        if remote:  # another machine's staging folder, or this one's: the URL has what rank 0 wrote
            remote.pull(skip=("tokens", "keep", "hooks"))
        metadata = read_json(out / METADATA_FILE, "Write the cache again with `saelab cache ... --overwrite`.")
    done = len(_finished_shards(out, metadata))
    if dp.is_main:
        say(f"caching {', '.join(cfg.hook_names)} of {cfg.model} over {cfg.contexts * cfg.context_size:,} tokens of "
            f"{cfg.dataset} into {out} ({cfg.dtype})" + (f", {done} shards already written" if done else "")
            + (f", {dp.world_size} processes writing shards in turn" if dp.active else ""))
    n_shards = _write_shards(out, metadata, cfg, model, hooks, reader, dp, remote)
    dp.barrier()  # every rank has written its shards
    if not dp.is_main:
        return
    if remote:
        remote.pull(PROGRESS_FOLDER)  # the other processes' records
    metadata["shards"] = _finished_shards(out, metadata)
    if len(metadata["shards"]) != n_shards:
        raise RuntimeError(f"{out}: shard {len(metadata['shards'])} of {n_shards} was not written (a process of the "
                           "run failed); run the same command again to continue")
    if not metadata["shards"]:
        raise ValueError(f"the dataset {cfg.dataset!r} gave no full context of {cfg.context_size} tokens; "
                         "check the dataset path, split and text column")
    _count_shards(metadata)
    metadata["complete"] = True
    write_json(out / METADATA_FILE, metadata)
    shutil.rmtree(out / PROGRESS_FOLDER, ignore_errors=True)  # metadata.json lists every shard now
    if remote:
        remote.push([out / METADATA_FILE])
        remote.remove(PROGRESS_FOLDER)
    size = sum(p.stat().st_size for p in out.rglob("*.npy")) if remote is None else \
        sum(metadata["rows"] * hook["d_in"] for hook in metadata["hooks"].values()) * np.dtype(
            DTYPES[metadata["dtype"]][0]).itemsize
    say(f"cache complete: {metadata['tokens']:,} tokens, {metadata['rows']:,} rows per hook, "
        f"{len(metadata['shards'])} shards, {size / 2**20:,.1f} MiB in {cfg.out}")


def _write_shards(out: Path, metadata: dict, cfg: CacheConfig, model, hooks: list[HookPoint],
                  reader: LMActivationSource, dp: DataParallel, remote: RemoteFolder | None = None) -> int:
    """This process's shards not yet written (all of them, on one process; every world_size-th under torchrun),
    each recorded in progress/ once all its files are in place; returns how many shards the text gives.

    Every process tokenises the whole text (cheap) and runs the model only on its own shards' contexts. Rank 0
    copies the finished shards into metadata.json as they complete in order, so that an interrupted cache
    written by one process lists them as it always has."""
    widths = {name: hook["d_in"] for name, hook in metadata["hooks"].items()}
    finished = len(_finished_shards(out, metadata))
    already = {index for index in range(_shard_count(cfg)) if index < finished or _progress_path(out, index).exists()}
    mine = [index for index in range(_shard_count(cfg)) if index % dp.world_size == dp.rank]
    per_shard = cfg.batches_per_shard * cfg.lm_batch_size * cfg.context_size
    count = 0
    with tqdm(total=len(mine) * per_shard, initial=len(already.intersection(mine)) * per_shard, desc="caching",
              unit="tok", unit_scale=True, disable=not cfg.progress or not dp.is_main, dynamic_ncols=True) as bar:
        batches = reader.token_batches(0)
        while shard := list(islice(batches, cfg.batches_per_shard)):
            index, count = count, count + 1
            if index % dp.world_size != dp.rank or index in already:
                continue
            with writing(out, f"shard {index} of the cache", "the shards written before are intact: free some disk "
                         "space and run the same command again to continue",
                         leftovers=out.rglob(f"shard_{index:05d}.tmp.npy")):
                rows, files = _write_shard(out, index, shard, model, hooks, reader.keep_mask, widths,
                                           metadata["dtype"], bar.update)
                if remote:  # the shard's files, uploaded, need no room here
                    remote.push(files, remove=True)
                _progress_path(out, index).parent.mkdir(exist_ok=True)
                write_json(_progress_path(out, index), {"contexts": sum(len(b) for b in shard), "rows": rows})
                if remote:
                    remote.push([_progress_path(out, index)])
            if dp.is_main:
                metadata["shards"] = _finished_shards(out, metadata)
                _count_shards(metadata)
                write_json(out / METADATA_FILE, metadata)
                if remote:
                    remote.push([out / METADATA_FILE])
    return count


PROGRESS_FOLDER = "progress"  # one small JSON per finished shard while a cache is being written


def _progress_path(out: Path, index: int) -> Path:
    return out / PROGRESS_FOLDER / f"shard_{index:05d}.json"


def _shard_count(cfg: CacheConfig) -> int:
    """Shards the cache has when the text is long enough (fewer when it ends first)."""
    return math.ceil(cfg.contexts / (cfg.batches_per_shard * cfg.lm_batch_size))


def _finished_shards(out: Path, metadata: dict) -> list[dict]:
    """The shards finished without a gap from shard 0: those metadata.json lists, then those recorded in
    progress/ (written by any process)."""
    shards = list(metadata["shards"])
    while (path := _progress_path(out, len(shards))).exists():
        shards.append(read_json(path, "Write the cache again with `saelab cache ... --overwrite`."))
    return shards


def _count_shards(metadata: dict) -> None:
    metadata["contexts"] = sum(shard["contexts"] for shard in metadata["shards"])
    metadata["tokens"] = metadata["contexts"] * metadata["context_size"]
    metadata["rows"] = sum(shard["rows"] for shard in metadata["shards"])


def _existing_metadata(out: Path, cfg: CacheConfig, overwrite: bool) -> dict | None:
    """The metadata of a cache already in ``out`` written with the same config (None: start afresh)."""
    path = out / METADATA_FILE
    if not path.exists():
        if out.exists() and any(p.name != FETCHED_FILE for p in out.iterdir()):
            raise FileExistsError(f"{out} is a non-empty folder without {METADATA_FILE}, not an activation cache; "
                                  "choose another --out")
        return None
    metadata = read_json(path, "Write the cache again with `saelab cache ... --overwrite`.")
    if metadata.get("format") != FORMAT:
        raise FileExistsError(f"{path} is not the metadata of a saelab activation cache; choose another --out")
    if overwrite:
        for name in ("tokens", "keep", "hooks", PROGRESS_FOLDER):
            shutil.rmtree(out / name, ignore_errors=True)
        path.unlink()
        return None
    wanted = _content_config(cfg)
    changed = [f"{name} {metadata['config'].get(name)!r} -> {value!r}" for name, value in wanted.items()
               if metadata["config"].get(name) != value]
    if changed:
        raise ValueError(f"{out} holds a cache written with another config ({'; '.join(changed)}). Rerun with its "
                         "config to continue it, pass --overwrite to replace it, or choose another --out.")
    return metadata


def _content_config(cfg: CacheConfig) -> dict:
    """What decides the cache's content: every field but the ``runtime`` ones (a rerun may change those and
    still continue the cache)."""
    runtime = fields_with(CacheConfig, "runtime")
    return {name: value for name, value in asdict(cfg).items() if name not in runtime}


def _new_metadata(cfg: CacheConfig, tokenizer, hooks: list[HookPoint], widths: dict[str, int]) -> dict:
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "saelab_version": __version__,
        "config": _content_config(cfg),
        "model": cfg.model, "tokenizer": tokenizer.name_or_path, "vocab_size": len(tokenizer),
        "hooks": {h.name: {"module_path": h.module_path, "reads_input": h.reads_input, "d_in": widths[h.name]}
                  for h in hooks},
        "dtype": cfg.dtype, "storage": f"{np.dtype(DTYPES[cfg.dtype][0]).name} .npy"
                                       + (" (raw bfloat16 bits)" if cfg.dtype == "bfloat16" else ""),
        "context_size": cfg.context_size, "prepend_bos": cfg.prepend_bos,
        "exclude_special_tokens": cfg.exclude_special_tokens, "sequence_separator_token": "bos",
        "dataset": cfg.dataset, "dataset_path": describe_source(cfg.dataset), "dataset_split": cfg.dataset_split,
        "text_column": cfg.text_column, "lm_batch_size": cfg.lm_batch_size,
        "contexts_per_shard": cfg.batches_per_shard * cfg.lm_batch_size,
        "shards": [], "contexts": 0, "tokens": 0, "rows": 0, "complete": False,
    }


def _write_shard(out: Path, index: int, batches: list[torch.Tensor], model, hooks: list[HookPoint], keep_mask,
                 widths: dict[str, int], dtype: str, on_batch) -> tuple[int, list[Path]]:
    """One shard: token ids, keep mask and every hook's rows, each written to a temporary file (activations
    through a memory map, one forward batch at a time) and renamed once all are complete; its rows per hook
    and its files."""
    tokens = torch.cat(batches)
    keep = keep_mask(tokens)
    rows = int(keep.sum())
    renames = []

    def temporary(kind: str) -> Path:
        final = shard_path(out, kind, index)
        final.parent.mkdir(parents=True, exist_ok=True)
        renames.append((final.with_name(final.stem + ".tmp.npy"), final))
        return renames[-1][0]

    np.save(temporary("tokens"), tokens.numpy().astype(np.int32))
    np.save(temporary("keep"), keep.numpy())
    arrays = {h.name: _open_rows(temporary(f"hooks/{h.name}"), rows, widths[h.name], dtype) for h in hooks}
    device, start = next(model.parameters()).device, 0
    for batch in batches:
        captured = capture(model, batch.to(device), hooks)
        batch_keep = keep_mask(batch)
        n = int(batch_keep.sum())
        for name, act in captured.items():
            arrays[name][start:start + n] = _storable(act[batch_keep.to(act.device)], dtype)
        start += n
        on_batch(batch.numel())
    for array in arrays.values():
        if isinstance(array, np.memmap):
            array.flush()
    del arrays
    for tmp, final in renames:
        os.replace(tmp, final)
    return rows, [final for _, final in renames]


def _open_rows(path: Path, rows: int, d_in: int, dtype: str) -> np.ndarray:
    if rows == 0:  # numpy cannot memory-map an empty array
        empty = np.zeros((0, d_in), DTYPES[dtype][0])
        np.save(path, empty)
        return empty
    return np.lib.format.open_memmap(path, mode="w+", dtype=DTYPES[dtype][0], shape=(rows, d_in))


def _storable(act: torch.Tensor, dtype: str) -> np.ndarray:
    stored = act.detach().to(DTYPES[dtype][1]).cpu()
    return stored.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else stored.numpy()


# --- reading -------------------------------------------------------------------------------------------
class ActivationCache:
    """A cache folder written by ``saelab cache``, opened for reading (only metadata.json is read here)."""

    def __init__(self, path):
        # At a URL (s3://...): metadata.json is read from there, the shards streamed (storage.ShardFetcher).
        self.remote = RemoteFolder(path) if is_url(path) else None
        self.fetcher = ShardFetcher(self.remote) if self.remote else None
        self.path = self.remote.url if self.remote else Path(path)
        found = self.remote.exists(METADATA_FILE) if self.remote else (self.path / METADATA_FILE).exists()
        if not found:
            exists = self.remote.exists() if self.remote else self.path.exists()
            what = "does not exist" if not exists else f"holds no {METADATA_FILE}: it is no activation cache"
            raise FileNotFoundError(f"activation cache {self.path} {what}. Write one with `saelab cache --hooks ... "
                                    f"--out {self.path}`.")
        meta = self.remote.fetch(METADATA_FILE, self.remote.reading / METADATA_FILE) if self.remote \
            else self.path / METADATA_FILE
        self.metadata = read_json(meta, "Write the cache again with `saelab cache ... --overwrite`.")
        if self.metadata.get("format") != FORMAT or self.metadata.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{meta} is not a saelab activation cache of format version {FORMAT_VERSION}")
        if not self.metadata["complete"]:
            raise ValueError(f"activation cache {self.path} is incomplete ({self.metadata['tokens']:,} tokens "
                             "written); rerun the `saelab cache` command that started it to finish it")

    @property
    def hooks(self) -> list[str]:
        return list(self.metadata["hooks"])

    @property
    def n_contexts(self) -> int:
        return self.metadata["contexts"]

    def hook_info(self, name: str) -> dict:
        """``module_path``, ``reads_input`` and ``d_in`` of one cached hook; an unknown name lists the cached ones."""
        if name not in self.metadata["hooks"]:
            raise ValueError(f"activation cache {self.path} has no hook {name!r}; it holds {', '.join(self.hooks)} "
                             "(choose one with --hook)")
        return self.metadata["hooks"][name]

    def only_hook(self) -> str:
        """The hook to use when none is named: the cache's only one."""
        if len(self.hooks) != 1:
            raise ValueError(f"activation cache {self.path} holds {len(self.hooks)} hooks ({', '.join(self.hooks)}); "
                             "choose one with --hook")
        return self.hooks[0]

    def configure(self, cfg, hooks: list[str]):
        """``cfg`` (a training config) with what the cache fixes (its fields declared ``cached``: model, text,
        packing) taken from it. A field set to something other than its default and the cache's value is a
        contradiction, and an error. Every hook in ``hooks`` must be cached."""
        for hook in hooks:
            self.hook_info(hook)
        cached = {name: self.metadata["config"][name] for name in fields_with(type(cfg), "cached")}
        defaults = {f.name: default_of(f) for f in fields(type(cfg))}
        clashes = [f"{name} {getattr(cfg, name)!r} (the cache's: {value!r})" for name, value in cached.items()
                   if getattr(cfg, name) not in (value, defaults[name])]
        if clashes:
            raise ValueError(f"activation cache {self.path} was written with other settings than asked: "
                             f"{'; '.join(clashes)}. Training on a cache takes them from it: drop those options.")
        return replace(cfg, **cached)

    def source(self, hooks: str | list[str], stop: int | None = None) -> CachedActivationSource:
        return CachedActivationSource(self, hooks, stop)

    def batches(self, hook: str, start: int = 0, stop: int | None = None,
                every: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(rows [n, d_in] float32, keep [contexts, context_size])`` over contexts ``[start, stop)``, at most
        one forward batch at a time; batches begin at multiples of ``lm_batch_size`` (the units of training).
        ``every`` n: only every n-th forward batch from the first (one process's share); the others are not read."""
        stop = self.n_contexts if stop is None else min(stop, self.n_contexts)
        per_shard, per_batch = self.metadata["contexts_per_shard"], self.metadata["lm_batch_size"]
        first_batch = start // per_batch
        for index in range(start // per_shard, len(self.metadata["shards"])):
            first = index * per_shard
            if first >= stop:
                return
            rows, keep = self._open_shard(hook, index)
            offsets = np.concatenate(([0], np.cumsum(keep.sum(1))))
            lo, hi = max(start, first) - first, min(stop - first, len(keep))
            while lo < hi:
                end = min((lo // per_batch + 1) * per_batch, hi)
                if ((first + lo) // per_batch - first_batch) % every == 0:
                    yield self._tensor(rows[offsets[lo]:offsets[end]]), torch.from_numpy(np.array(keep[lo:end]))
                lo = end

    def activations(self, hook: str, start: int = 0, stop: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(act [contexts, context_size, d_in], keep)`` over contexts ``[start, stop)``: the rows put back at
        their positions (zeros where nothing is stored), the shape a model forward gives."""
        d_in = self.hook_info(hook)["d_in"]
        for rows, keep in self.batches(hook, start, stop):
            act = torch.zeros(*keep.shape, d_in)
            act[keep] = rows
            yield act, keep

    def row_count(self, stop: int | None = None) -> int:
        """Activation rows (kept positions) of the first ``stop`` contexts (default: all)."""
        stop = self.n_contexts if stop is None else stop
        total, per_shard = 0, self.metadata["contexts_per_shard"]
        for index, shard in enumerate(self.metadata["shards"]):
            first = index * per_shard
            if first + shard["contexts"] <= stop:
                total += shard["rows"]
            elif first < stop:
                total += int(_read_npy(self._shard_file("keep", index))[:stop - first].sum())
        return total

    def _open_shard(self, hook: str, index: int) -> tuple[np.ndarray, np.ndarray]:
        self.hook_info(hook)
        return _read_npy(self._shard_file(f"hooks/{hook}", index), mmap_mode="r"), _read_npy(self._shard_file("keep", index))

    def _shard_file(self, kind: str, index: int) -> Path:
        """The local path of a shard file: in the folder, or downloaded (with the next ones coming) from the URL."""
        try:
            if self.fetcher is not None:
                return self.fetcher.path(kind, index, lambda i: shard_name(kind, i))
            path = shard_path(self.path, kind, index)
            if not path.exists():
                raise FileNotFoundError(path)
            return path
        except FileNotFoundError:
            raise FileNotFoundError(f"activation cache {self.path} is damaged: {shard_name(kind, index)} is missing. "
                                    "Write it again with `saelab cache ... --overwrite`.") from None

    def _tensor(self, rows: np.ndarray) -> torch.Tensor:
        rows = np.array(rows)  # a copy: only these rows leave the memory map
        if self.metadata["dtype"] == "bfloat16":
            return torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16).float()
        return torch.from_numpy(rows).float()


class CachedActivationSource(ShardableSource):
    """Hooks of an activation cache as an ``ActivationSource``, over its first ``stop`` contexts (default: all).
    Units are the cache's forward batches, read through memory maps, so ``ActivationBuffer`` shuffles it in
    bounded memory and resumes exactly, as it does the model. Several hooks sit side by side in each unit
    (``columns[hook]``), as ``LMActivationSource`` gives them."""

    def __init__(self, cache: ActivationCache, hooks: str | list[str], stop: int | None = None):
        self.cache, self.hooks = cache, list(dict.fromkeys([hooks] if isinstance(hooks, str) else hooks))
        self.columns, offset = {}, 0
        for hook in self.hooks:
            width = cache.hook_info(hook)["d_in"]
            self.columns[hook] = slice(offset, offset + width)
            offset += width
        self.d_in = offset
        self.stop = cache.n_contexts if stop is None else stop
        if not 0 < self.stop <= cache.n_contexts:
            raise ValueError(f"activation cache {cache.path} has {cache.n_contexts} contexts; cannot train on the "
                             f"first {self.stop}")

    def rows(self) -> int:
        return self.cache.row_count(self.stop)

    def units(self, start: int) -> Iterator[torch.Tensor]:
        first = self.part.first(start) * self.cache.metadata["lm_batch_size"]
        readers = [self.cache.batches(hook, first, self.stop, every=self.part.count) for hook in self.hooks]
        for parts in zip(*readers):
            rows = [part[0] for part in parts]
            yield rows[0] if len(rows) == 1 else torch.cat(rows, dim=-1)


def _read_npy(path: Path, mmap_mode: str | None = None) -> np.ndarray:
    """A shard as numpy reads it, refusing pickled objects (they could run code) with an error naming the file."""
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, EOFError) as err:
        raise ValueError(f"{path} is not an activation shard saelab wrote ({err}); it is not loaded. Write the cache "
                         "again with `saelab cache ... --overwrite`.") from None


def shard_name(kind: str, index: int) -> str:
    """A shard file's path inside a cache folder, e.g. ``hooks/blocks.6.hook_resid_post/shard_00003.npy``."""
    return f"{kind}/shard_{index:05d}.npy"


def shard_path(folder: Path, kind: str, index: int) -> Path:
    return Path(folder) / shard_name(kind, index)
