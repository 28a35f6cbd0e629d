"""The input pipeline: sources, tokenizers, the packing rule, determinism and resumption."""

import json
import random
import sys
import threading
import time

import numpy as np
import pytest
from helpers import tiny

from segexec_jax.config import ConfigError
from segexec_jax.data import pipeline as data
from segexec_jax.data import synthetic
from segexec_jax.data.tokenization import (
    ByteTokenizer,
    TokenizerError,
    check_fits,
    load_tokenizer,
)

BYTES = ByteTokenizer()


@pytest.fixture(autouse=True)
def index_cache(tmp_path, monkeypatch):
    """Indexes of data files go to the test's own folder, not ~/.cache."""
    monkeypatch.setenv("SEGEXEC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def pack_docs(docs, T, S, rows, whole=False):
    import grain

    ds = grain.MapDataset.source([np.asarray(d, np.int32) for d in docs]).repeat(None).to_iter_dataset()
    it = iter(data.PackedRows(ds, T, S, whole))
    return [next(it) for _ in range(rows)], it


def test_packing_rule():
    """A document that does not fit the rest of its segment starts at the next boundary;
    one that fits shares the segment; one longer than the row continues in the next row."""
    S, T = 8, 24
    docs = [[1] * 5, [2] * 3, [3] * 4, [4] * 30, [5] * 2]
    rows, _ = pack_docs(docs, T, S, 3)
    r0 = rows[0]
    np.testing.assert_array_equal(r0["tokens"][:8], [1] * 5 + [2] * 3)  # 5 + 3 share segment 0
    np.testing.assert_array_equal(r0["doc_ids"][:8], [1] * 5 + [2] * 3)
    np.testing.assert_array_equal(r0["tokens"][8:12], [3] * 4)  # fits in segment 1
    np.testing.assert_array_equal(r0["doc_ids"][12:16], [0] * 4)  # doc 4 does not: padding
    np.testing.assert_array_equal(r0["tokens"][16:24], [4] * 8)  # ...and starts at a boundary
    np.testing.assert_array_equal(rows[1]["tokens"], [4] * 22 + [5] * 2)  # continues, then doc 5
    np.testing.assert_array_equal(rows[1]["doc_ids"], [1] * 22 + [2] * 2)


def test_whole_documents_start_a_new_row():
    """With whole_documents, a document that fits in a row but not in the rest of this one
    starts the next row; one longer than a row still continues across rows."""
    S, T = 8, 24
    docs = [[1] * 5, [2] * 14, [3] * 20, [4] * 30, [5] * 2]
    rows, it = pack_docs(docs, T, S, 4, whole=True)
    np.testing.assert_array_equal(rows[0]["tokens"], [1] * 5 + [0] * 3 + [2] * 14 + [0] * 2)
    np.testing.assert_array_equal(rows[1]["tokens"], [3] * 20 + [0] * 4)  # 20 > 2 left: a new row
    np.testing.assert_array_equal(rows[2]["tokens"], [4] * 24)  # longer than a row: split
    np.testing.assert_array_equal(rows[3]["tokens"][:8], [4] * 6 + [5] * 2)
    state = it.get_state()
    after = [next(it) for _ in range(3)]
    it.set_state(state)
    for a, b in zip(after, [next(it) for _ in range(3)]):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
    split, _ = pack_docs(docs, T, S, 2)  # without it, document 3 is cut at the row's end
    np.testing.assert_array_equal(split[1]["tokens"][:2], [3] * 2)


def test_synthetic_documents_fit_their_rows_whole():
    cfg = tiny("train.seq_len=512", "segment.len=64", "train.batch_size=4", "data.synthetic={passkey: 1.0}",
               "data.whole_documents=true", "data.synthetic_length=[0.3, 0.9]")
    it = iter(data.dataset(cfg, BYTES, "train"))
    lengths = []
    for _ in range(6):
        for ids, toks in zip(*(lambda b: (b["doc_ids"], b["tokens"]))(next(it))):
            for d in range(1, ids.max() + 1):
                text = BYTES.decode(toks[ids == d])
                assert text.startswith("There is an important pass key") and text.endswith(".")  # whole
                key = text.rsplit(" ", 1)[1][:-1]
                assert f"The pass key is {key}." in text  # the answer is in the same row
                lengths.append(len(text))
    assert 0.3 * 512 - 80 <= min(lengths) and max(lengths) <= 512 and max(lengths) - min(lengths) > 100
    it.close()
    with pytest.raises(ConfigError, match="data.synthetic_length"):
        tiny("data.synthetic_length=[0.5, 0.2]")


def test_packing_invariants_on_the_corpus():
    cfg = tiny("train.seq_len=256", "segment.len=64", "train.batch_size=4")
    it = iter(data.dataset(cfg, BYTES, "train"))
    for _ in range(5):
        b = next(it)
        assert b["tokens"].shape == b["doc_ids"].shape == (4, 256) and b["tokens"].dtype == np.int32
        for ids in b["doc_ids"]:
            starts = [t for t in range(1, 256) if ids[t] != ids[t - 1] and ids[t] > 0]
            for t in starts:  # a document starting mid-segment ends within that segment
                end = t
                while end < 256 and ids[end] == ids[t]:
                    end += 1
                assert t % 64 == 0 or (end - 1) // 64 == t // 64
    it.close()


def test_iterator_state_restores_exactly_mid_document():
    cfg = tiny("train.seq_len=128", "segment.len=32", "train.batch_size=2", "data.synthetic={passkey: 0.3}")
    it = iter(data.prefetch(data.dataset(cfg, BYTES, "train")))
    for _ in range(3):
        next(it)
    state = it.get_state()
    json.dumps(state)  # checkpointable as JSON
    expected = [next(it) for _ in range(4)]
    it.close()
    again = iter(data.prefetch(data.dataset(cfg, BYTES, "train")))
    again.set_state(state)
    for e in expected:
        got = next(again)
        np.testing.assert_array_equal(got["tokens"], e["tokens"])
        np.testing.assert_array_equal(got["doc_ids"], e["doc_ids"])
    again.close()


def test_a_position_that_does_not_fit_the_data_is_an_error():
    """E.g. another process's position: past the end of this document it would never fill a row."""
    _, it = pack_docs([[1] * 5, [2] * 30], 24, 8, 1)
    state = it.get_state()
    assert state["pending"] and state["used"] == 16
    with pytest.raises(data.DataError, match="does not fit this data"):
        it.set_state(dict(state, used=31))


def test_deterministic_from_seed_and_shuffled_by_it():
    def first(seed):
        cfg = tiny("train.seq_len=128", "train.batch_size=2", f"train.seed={seed}")
        return next(iter(data.dataset(cfg, BYTES, "train")))["tokens"]

    np.testing.assert_array_equal(first(1), first(1))
    assert not np.array_equal(first(1), first(2))


def test_corpus_split_is_disjoint_and_by_file():
    cfg = tiny("data.val_fraction=0.1")
    train = data.documents(cfg, "train")
    val = data.documents(cfg, "validation")
    n = len(data.corpus_files())
    assert len(train) + len(val) == n and 0.05 * n < len(val) < 0.15 * n
    assert set(map(hash, (val[i] for i in range(5)))).isdisjoint(hash(train[i]) for i in range(len(train)))


def test_user_files_every_format(tmp_path):
    import array_record.python.array_record_module as ar
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("alpha document")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "beta one"}) + "\n\n" + json.dumps({"text": "beta two"}) + "\n")
    pq.write_table(pa.table({"text": ["gamma one", "gamma two", "gamma three"]}), tmp_path / "c.parquet")
    writer = ar.ArrayRecordWriter(str(tmp_path / "d.array_record"), "group_size:1")
    for t in ["delta one", json.dumps({"text": "delta two"})]:
        writer.write(t.encode())
    writer.close()
    cfg = tiny(f"data.files=['{tmp_path}/*.txt', '{tmp_path}/b.jsonl', '{tmp_path}/c.parquet', "
               f"'{tmp_path}/d.array_record']", "data.val_fraction=0")
    docs = data.documents(cfg, "train")
    assert sorted(docs[i] for i in range(len(docs))) == sorted(
        ["alpha document", "beta one", "beta two", "gamma one", "gamma two", "gamma three", "delta one", "delta two"])
    batch = next(iter(data.dataset(cfg.replace(train=cfg.train.__class__(seq_len=64, batch_size=1)), BYTES)))
    assert batch["tokens"].shape == (1, 64)


def test_bad_data_is_one_clear_error(tmp_path):
    with pytest.raises(data.DataError, match="'data.files': '.*nothing.*' matches no file"):
        data.documents(tiny(f"data.files=['{tmp_path}/nothing*.txt']"), "train")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(data.DataError, match="no train documents"):
        data.documents(tiny(f"data.files=['{tmp_path}/empty.jsonl']"), "train")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    docs = data.documents(tiny(f"data.files=['{tmp_path}/bad.jsonl']", "data.val_fraction=0"), "train")
    with pytest.raises(data.DataError, match="bad JSON line"):
        docs[0]
    (tmp_path / "bad.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(data.DataError, match="unreadable data"):
        data.documents(tiny(f"data.files=['{tmp_path}/bad.parquet']"), "train")


def write_parquet(path, texts, rows_per_group):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), path, row_group_size=rows_per_group)


def test_a_single_file_splits_by_documents(tmp_path):
    """One small JSONL file: both splits get documents, though the hash holds out none of these two."""
    texts = [f"document number {i}" for i in range(2)]
    (tmp_path / "one.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = tiny(f"data.files=['{tmp_path}/one.jsonl']", "data.val_fraction=0.05", "train.seq_len=32",
               "segment.len=16", "train.batch_size=2")
    train, val = data.documents(cfg, "train"), data.documents(cfg, "validation")
    train_texts, val_texts = [train[i] for i in range(len(train))], [val[i] for i in range(len(val))]
    assert train_texts and val_texts and sorted(train_texts + val_texts) == sorted(texts)
    for split in ("train", "validation"):
        assert next(iter(data.dataset(cfg, BYTES, split)))["tokens"].shape == (2, 32)


def test_a_single_document_trains_and_says_why_it_cannot_validate(tmp_path):
    (tmp_path / "book.txt").write_text("the only document " * 20)
    for fraction in ("0.05", "0.5", "0.9"):
        cfg = tiny(f"data.files=['{tmp_path}/book.txt']", f"data.val_fraction={fraction}", "train.seq_len=32",
                   "segment.len=16", "train.batch_size=1")
        assert next(iter(data.dataset(cfg, BYTES, "train")))["tokens"].shape == (1, 32)
        with pytest.raises(data.DataError, match="single document .* data.val_fraction=0 to train without"):
            data.documents(cfg, "validation")
    cfg = tiny(f"data.files=['{tmp_path}/book.txt']", "data.val_fraction=0")
    assert not data.has_validation(cfg) and data.has_validation(tiny())
    assert len(data.documents(cfg, "train")) == 1
    with pytest.raises(data.DataError, match="'data.val_fraction' is 0"):
        data.documents(cfg, "validation")


def test_parquet_reads_only_the_row_group_holding_the_document(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    texts = [f"row {i} " * (i % 7 + 1) for i in range(48)]
    write_parquet(tmp_path / "p.parquet", texts, rows_per_group=6)  # 8 row groups
    assert pq.ParquetFile(tmp_path / "p.parquet").metadata.num_row_groups == 8
    reads = {"whole": 0, "rows": []}
    read_table, read_file, read_row_group = pq.read_table, pq.ParquetFile.read, pq.ParquetFile.read_row_group

    def count_whole(*a, **k):
        reads["whole"] += 1
        return (read_table if not isinstance(a[0], pq.ParquetFile) else read_file)(*a, **k)

    def count_group(self, *a, **k):
        table = read_row_group(self, *a, **k)
        reads["rows"].append(table.num_rows)
        return table

    monkeypatch.setattr(pq, "read_table", count_whole)
    monkeypatch.setattr(pq.ParquetFile, "read", count_whole)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", count_group)
    source = data.ParquetFiles([tmp_path / "p.parquet"])
    source.cache_bytes = 1  # keeps only the last row group
    order = random.Random(0).sample(range(48), 48)
    assert [source[i] for i in order] == [texts[i] for i in order]  # the "text" column, not the first
    assert reads["whole"] == 0 and len(reads["rows"]) <= 48 and set(reads["rows"]) == {6}
    reads["rows"].clear()
    source = data.ParquetFiles([tmp_path / "p.parquet"])
    source.cache_bytes = 1
    assert [source[i] for i in range(48)] == texts
    assert len(reads["rows"]) == 8  # in file order, each row group once


def test_parquet_is_safe_to_read_from_many_threads(tmp_path):
    """grain's map reads from several threads at once, here with a cache that churns under them.
    Each thread yields to the others between any two lines of the data module, to meet the races."""
    texts = [f"file {f} row {r}" for f in range(3) for r in range(40)]
    for f in range(3):
        write_parquet(tmp_path / f"{f}.parquet", texts[40 * f:40 * (f + 1)], rows_per_group=8)
    source = data.ParquetFiles(sorted(tmp_path.glob("*.parquet")))
    source.cache_bytes = 2000  # a few row groups
    wrong = []

    def yield_between_lines(frame, event, arg):
        def on_line(frame, event, arg):
            if event == "line":
                time.sleep(0)
            return on_line
        return on_line if frame.f_code.co_filename == data.__file__ else None

    def read(seed):
        sys.settrace(yield_between_lines)
        for i in random.Random(seed).choices(range(len(texts)), k=150):
            if (got := source[i]) != texts[i]:
                wrong.append((i, got))

    threads = [threading.Thread(target=read, args=(seed,)) for seed in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong, f"{len(wrong)} wrong documents, e.g. {wrong[:3]}"


def test_jsonl_index_matches_reading_line_by_line(tmp_path):
    """The numpy index finds the same non-blank lines as Python's line loop, across chunk edges."""
    lines = [json.dumps({"text": "a"}), "", "   ", json.dumps({"text": "é ✓ b"}) + "\r", "\t" + json.dumps({"x": "c"}),
             " \t \r", json.dumps({"text": "d" * 50}), "\x0c", json.dumps({"text": "last, no newline"})]
    path = tmp_path / "t.jsonl"
    path.write_bytes("\n".join(lines).encode())

    def reference(path):  # the old index: a Python loop over lines
        out, offset = [], 0
        with open(path, "rb") as f:
            for line in f:
                if line.strip():
                    out.append([offset, offset + len(line.rstrip(b"\n"))])
                offset += len(line)
        return out

    for chunk in (1, 3, 7, 64, 1 << 20):
        spans = data.line_spans(path, chunk=chunk)
        assert spans.tolist() == reference(path)
        raw = path.read_bytes()
        assert [raw[a:b].decode() for a, b in spans] == [x for x in lines if x.strip()]
    rng = random.Random(0)
    for _ in range(100):  # random bytes from a small alphabet of whitespace and text
        fuzz = tmp_path / "fuzz.jsonl"
        fuzz.write_bytes(bytes(rng.choices(b" \t\r\n\x0bx{", k=rng.randrange(30))))
        assert data.line_spans(fuzz, chunk=rng.randrange(1, 9)).tolist() == reference(fuzz)
    docs = data.JsonlFiles([path])
    assert [docs[i] for i in range(len(docs))] == ["a", "é ✓ b", "c", "d" * 50, "last, no newline"]
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert len(data.JsonlFiles([tmp_path / "empty.jsonl"])) == 0


def test_jsonl_index_is_built_once_and_renewed_when_the_file_changes(tmp_path, monkeypatch, index_cache):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(5)))
    scans = []
    line_spans = data.line_spans
    monkeypatch.setattr(data, "line_spans", lambda p, **k: scans.append(p) or line_spans(p, **k))
    assert len(data.JsonlFiles([path])) == 5 and len(scans) == 1
    assert len(data.JsonlFiles([path])) == 5 and len(scans) == 1  # from the cache
    assert len(list(index_cache.rglob("*.npy"))) == 1
    with open(path, "a") as f:
        f.write(json.dumps({"text": "doc 5"}) + "\n")
    docs = data.JsonlFiles([path])
    assert len(docs) == 6 and docs[5] == "doc 5" and len(scans) == 2


def test_synthetic_mixture_follows_weights():
    cfg = tiny("train.seq_len=256", "train.batch_size=8", "data.synthetic={passkey: 0.5}")
    docs = data.documents(cfg, "train")  # the corpus alone
    it = iter(data.dataset(cfg, BYTES, "train"))
    texts = [BYTES.decode(row) for _ in range(50) for row in next(it)["tokens"]]
    share = np.mean(["pass key" in t for t in texts])
    assert 0.3 < share < 0.75, share  # half the tokens: about half the rows
    assert len(docs) > 100


def test_synthetic_tasks_are_deterministic_and_answerable():
    for task in synthetic.TASKS:
        a = synthetic.generate(task, seed=3, index=7, length=3000)
        assert a == synthetic.generate(task, seed=3, index=7, length=3000)
        assert a != synthetic.generate(task, seed=3, index=8, length=3000)
        assert 1500 < len(a.prompt) < 6000, (task, len(a.prompt))
        assert a.answers and all(ans in a.prompt for ans in a.answers if task not in ("common_words", "frequent_words"))


def test_tokenizers(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    text = ["the quick brown fox jumps over the lazy dog"] * 50
    hf = Tokenizer(models.BPE(unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.train_from_iterator(text, trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]", "</s>"]))
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(str(tmp_path / "tokenizer.json"))
    ids = tok.encode("the lazy fox")
    assert tok.decode(ids).replace(" ", "") == "thelazyfox" and tok.eos_id == hf.token_to_id("</s>")
    assert load_tokenizer(str(tmp_path)).vocab_size == tok.vocab_size  # a directory holding one

    import sentencepiece as spm

    (tmp_path / "corpus.txt").write_text("\n".join(text + ["a b c d e f g h i j k l m n o p"] * 20))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=40, model_type="bpe")
    sp = load_tokenizer(str(tmp_path / "sp.model"))
    assert sp.decode(sp.encode("the lazy dog")) == "the lazy dog" and sp.vocab_size == 40

    assert BYTES.decode(BYTES.encode("héllo ✓")) == "héllo ✓"
    with pytest.raises(TokenizerError, match="'data.tokenizer': tokenizer 'missing.json' not found"):
        load_tokenizer("missing.json")
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(TokenizerError, match="cannot load"):
        load_tokenizer(str(tmp_path / "broken.json"))
    with pytest.raises(TokenizerError, match="'model.vocab_size'"):
        check_fits(tok, 10)
