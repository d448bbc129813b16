"""Text sources: every way a user can name a corpus, turned into one stream of documents.

A document is a ``str`` (to be tokenised) or a ``list[int]`` (already tokenised).
"""

from __future__ import annotations

import ast
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

Document = str | list[int]
TOKEN_COLUMNS = ("input_ids", "tokens")
TEXT_COLUMNS = ("text", "content", "document", "sentence")
FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
TXT_LINES_PER_PIECE = 200  # a .txt file is one document, tokenised in pieces of this many lines


class DatasetError(ValueError):
    pass


def _python_reference() -> Iterator[str]:
    """The Python language reference that ships with every CPython (pydoc's help topics)."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]


def _python_docstrings() -> Iterator[str]:
    """Long docstrings of the standard library's modules, classes and functions."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        parts = set(path.relative_to(root).parts)
        if parts & {"site-packages", "test", "tests", "idlelib", "lib2to3"}:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200:
                    yield doc


PYTHON_DOCS_DOCSTRING_CHARS = 750_000  # sized so one forward pass over the corpus takes ~2.5 min on 2 cores


def _python_docs() -> Iterator[str]:
    """The reference plus the first 750k characters of docstrings: ~300k tokens of English prose."""
    yield from _python_reference()
    budget = PYTHON_DOCS_DOCSTRING_CHARS
    for doc in _python_docstrings():
        if budget <= 0:
            return
        budget -= len(doc)
        yield doc


BUILTIN_CORPORA = {
    "python-docs": _python_docs,
    "python-reference": _python_reference,
    "python-docstrings": _python_docstrings,
}


def iter_documents(source: str, split: str = "train", text_column: str | None = None) -> Iterator[Document]:
    """Yield documents from a builtin corpus name, a local file or folder, or a Hugging Face dataset id."""
    if source in BUILTIN_CORPORA:
        yield from BUILTIN_CORPORA[source]()
        return
    path = Path(source).expanduser()
    if path.is_file():
        yield from _file_documents(path, text_column)
    elif path.is_dir():
        yield from _folder_documents(path, split, text_column)
    elif path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise DatasetError(f"dataset {source!r}: no such file or folder")
    else:
        yield from _hub_documents(source, split, text_column)


def iter_rows(source: str, split: str = "train") -> Iterator[tuple[dict, str]]:
    """``(row, where)`` for every row of a table-like dataset (a .jsonl/.parquet file, a folder of them, a saved
    HF dataset, a hub id): for the tasks that need more than text, e.g. a label column."""
    path = Path(source).expanduser()
    if source in BUILTIN_CORPORA or (path.is_file() and path.suffix.lower() == ".txt"):
        raise DatasetError(f"dataset {source!r} is plain text, without columns: give a .jsonl or .parquet file, a "
                           "saved dataset or a hub id with a text and a label column")
    if path.is_file():
        yield from _file_rows(path)
    elif path.is_dir():
        if _is_saved_dataset(path):
            import datasets

            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise DatasetError(f"{path} has splits {list(data)}, not {split!r}; pass --dataset-split")
                data = data[split]
            for row in data:
                yield row, str(path)
            return
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (".jsonl", ".json", ".parquet"))
        if not files:
            raise DatasetError(f"folder {path} holds no .jsonl/.parquet files and is no saved HF dataset")
        for file in files:
            yield from _file_rows(file)
    elif path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise DatasetError(f"dataset {source!r}: no such file or folder")
    else:
        import datasets

        try:
            data = datasets.load_dataset(source, split=split, streaming=True)
        except Exception as err:  # datasets raises many kinds; all mean "cannot get it"
            raise DatasetError(
                f"could not open Hugging Face dataset {source!r} (split {split!r}): {err}\n"
                "Where the hub is unreachable, pass a local .txt/.jsonl/.parquet file or folder, or a builtin "
                f"corpus: {', '.join(BUILTIN_CORPORA)}."
            ) from err
        for row in data:
            yield row, source


def _file_rows(path: Path) -> Iterator[tuple[dict, str]]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        yield json.loads(line), f"{path}:{line_no}"
                    except json.JSONDecodeError as err:
                        raise DatasetError(f"{path}:{line_no}: not a JSON object per line ({err})") from err
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield row, str(path)
    else:
        raise DatasetError(f"{path}: unsupported file type {suffix!r}; use .jsonl or .parquet")


def _file_documents(path: Path, text_column: str | None) -> Iterator[Document]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        yield from _txt_pieces(path)
    elif suffix in (".jsonl", ".json", ".parquet"):
        for row, where in _file_rows(path):
            yield _row_document(row, text_column, where=where)
    else:
        raise DatasetError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")


def _txt_pieces(path: Path) -> Iterator[str]:
    # One document per file: no separator tokens inside running text, and bounded tokenizer inputs.
    piece: list[str] = []
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            piece.append(line)
            if len(piece) >= TXT_LINES_PER_PIECE:
                yield "".join(piece)
                piece = []
    if piece:
        yield "".join(piece)


def _folder_documents(path: Path, split: str, text_column: str | None) -> Iterator[Document]:
    if _is_saved_dataset(path):
        for row, where in iter_rows(str(path), split):
            yield _row_document(row, text_column, where=where)
        return
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FILE_SUFFIXES)
    if not files:
        raise DatasetError(f"folder {path} holds no {'/'.join(FILE_SUFFIXES)} files and is no saved HF dataset")
    for file in files:
        yield from _file_documents(file, text_column)


def _hub_documents(name: str, split: str, text_column: str | None) -> Iterator[Document]:
    for row, where in iter_rows(name, split):
        yield _row_document(row, text_column, where=where)


def _is_saved_dataset(path: Path) -> bool:
    return any((path / name).exists() for name in ("dataset_info.json", "dataset_dict.json", "state.json"))


def _row_document(row: dict, text_column: str | None, where: str) -> Document:
    if text_column is not None:
        if text_column not in row:
            raise DatasetError(f"{where}: no column {text_column!r}; columns are {sorted(row)}")
        return row[text_column]
    for column in TOKEN_COLUMNS:
        if column in row:
            return list(row[column])
    for column in TEXT_COLUMNS:
        if column in row:
            return row[column]
    raise DatasetError(f"{where}: no text column among {sorted(row)}; pass --text-column NAME")


def describe_source(source: str) -> str:
    """A stable description of the corpus for the SAE's metadata."""
    if source in BUILTIN_CORPORA:
        return f"saelab:{source}"
    return os.path.abspath(source) if os.path.exists(source) else source
