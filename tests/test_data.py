"""Text sources, packing into contexts, and the activation buffer."""

import json

import pytest
import torch

from conftest import make_tokenizer
from saelab.data import ActivationBuffer, DatasetError, Packing, TensorSource, iter_documents, pack_contexts
from saelab.data.text import BUILTIN_CORPORA


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def test_builtin_corpora_are_real_text_available_offline():
    for name in BUILTIN_CORPORA:
        docs = [d for _, d in zip(range(50), iter_documents(name))]
        assert len(docs) == 50 and all(isinstance(d, str) and len(d) > 100 for d in docs)
        assert sum(d.count(" the ") for d in docs) > 50  # English prose, not code


def test_contexts_start_with_bos_and_separate_documents_with_it(tokenizer):
    docs = ["alpha beta gamma " * 30, "delta epsilon " * 30, "zeta eta theta " * 30]
    contexts = list(pack_contexts(docs, tokenizer, Packing(context_size=32)))
    bos = tokenizer.bos_token_id
    assert contexts and all(len(c) == 32 and c[0] == bos for c in contexts)
    stream = [t for c in contexts for t in c[1:]]
    expected = tokenizer(docs[0], add_special_tokens=False)["input_ids"] + [bos]
    assert stream[:len(expected)] == expected
    no_bos = list(pack_contexts(docs, tokenizer, Packing(context_size=32, prepend_bos=False)))
    assert no_bos[0] == tokenizer(docs[0], add_special_tokens=False)["input_ids"][:32]


def test_pretokenized_rows_of_context_length_are_used_as_they_are(tokenizer):
    bos = tokenizer.bos_token_id
    rows = [[bos, *range(10, 17)], [bos, *range(20, 27)]]
    assert list(pack_contexts(rows, tokenizer, Packing(context_size=8))) == rows


def test_local_file_formats_give_the_same_documents(tmp_path):
    texts = ["The first document is here.", "A second one, somewhat longer than the first."]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)))
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": texts}), tmp_path / "b.parquet")
    assert list(iter_documents(str(tmp_path / "a.jsonl"))) == texts
    assert list(iter_documents(str(tmp_path / "b.parquet"))) == texts
    (tmp_path / "c.txt").write_text("line one\nline two\n")
    assert "".join(iter_documents(str(tmp_path / "c.txt"))) == "line one\nline two\n"
    assert len(list(iter_documents(str(tmp_path)))) == 2 + 2 + 1  # a folder reads every file


def test_token_columns_and_saved_hf_datasets(tmp_path):
    import datasets
    datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5]]}).save_to_disk(str(tmp_path / "ds"))
    assert list(iter_documents(str(tmp_path / "ds"))) == [[1, 2, 3], [4, 5]]
    (tmp_path / "t.jsonl").write_text(json.dumps({"tokens": [7, 8, 9]}))
    assert list(iter_documents(str(tmp_path / "t.jsonl"))) == [[7, 8, 9]]


def test_dataset_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        list(iter_documents(str(tmp_path / "missing.txt")))
    (tmp_path / "x.jsonl").write_text(json.dumps({"body": "hi"}))
    with pytest.raises(DatasetError, match="--text-column"):
        list(iter_documents(str(tmp_path / "x.jsonl")))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DatasetError, match="unsupported file type"):
        list(iter_documents(str(tmp_path / "x.csv")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds no"):
        list(iter_documents(str(tmp_path / "empty")))


class CountingSource(TensorSource):
    def __init__(self, data, rows_per_unit):
        super().__init__(data, rows_per_unit)
        self.calls = 0

    def units(self, start):
        self.calls += 1
        return super().units(start)


def test_buffer_serves_each_row_once_per_block_and_bounds_memory():
    data = torch.arange(1000, dtype=torch.float32)[:, None].repeat(1, 3)
    buffer = ActivationBuffer(CountingSource(data, rows_per_unit=100), buffer_tokens=300, batch_size=50, seed=0)
    stream = buffer.batches()
    first_block = torch.cat([next(stream) for _ in range(6)])[:, 0]
    assert sorted(first_block.tolist()) == list(range(300))          # a shuffled block of 300 rows
    assert first_block.tolist() != list(range(300))
    assert len(buffer._block) <= 300
    rest = torch.cat([next(stream) for _ in range(14)])[:, 0]
    assert sorted(rest[:600].tolist()) == list(range(300, 900))     # blocks follow the source in order
    assert set(rest[600:].tolist()) <= set(range(900, 1000))        # then the epoch's remainder


def test_a_source_that_fits_is_computed_once_and_reshuffled_each_epoch():
    data = torch.arange(200, dtype=torch.float32)[:, None]
    source = CountingSource(data, rows_per_unit=64)
    stream = ActivationBuffer(source, buffer_tokens=1000, batch_size=50, seed=0).batches()
    epochs = [torch.cat([next(stream) for _ in range(4)])[:, 0].tolist() for _ in range(3)]
    assert source.calls == 1
    assert all(sorted(e) == list(range(200)) for e in epochs)
    assert epochs[0] != epochs[1]


class GrowingUnits:
    """Units of 10, 50 and 200 rows: the third outgrows the room a block makes from the first."""

    d_in = 2

    def units(self, start):
        first = 0
        for size in (10, 50, 200)[start:]:
            yield torch.arange(first, first + size, dtype=torch.float32)[:, None].repeat(1, 2)
            first += size


def test_a_block_holds_every_row_of_its_units_in_order_when_a_unit_outgrows_its_room():
    buffer = ActivationBuffer(GrowingUnits(), buffer_tokens=100, batch_size=20, seed=0)
    assert buffer.peek(260)[:, 0].tolist() == list(range(260))       # 10 + 50 + 200 rows, moved once
    assert buffer.peek(260).shape == (260, 2)
    stream = buffer.batches()
    assert sorted(torch.cat([next(stream) for _ in range(13)])[:, 0].tolist()) == list(range(260))


def test_empty_source_is_a_clear_error():
    stream = ActivationBuffer(TensorSource(torch.zeros(0, 4)), buffer_tokens=100, batch_size=10, seed=0).batches()
    with pytest.raises(ValueError, match="empty"):
        next(stream)
