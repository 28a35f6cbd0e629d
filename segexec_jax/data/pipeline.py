"""The input pipeline (grain): documents -> tokens -> rows packed by the segment rule -> batches.

Sources (SPEC §6): the embedded corpus (the Python standard library's own source files,
one document per file, split by file into train and validation), or `data.files`: text
files (one document each), JSONL (one document per line, its "text" field), Parquet (a
"text" column) and ArrayRecord (one document per record), with globs. Synthetic long-context
tasks mix in by weight (`data.synthetic`).

Packing (SPEC §2): a document that does not fit in what is left of the current segment
starts at the next segment boundary (the rest is padding, document id 0); a document that
fits may share the segment; a document longer than what is left of the row continues at
the start of the next row. Each document in a row gets its own id (1, 2, ...).

Splits: documents are held out for validation by a hash of their index (`data.val_fraction`;
0 holds none out: no validation split). JSONL is opened through an index of line offsets
(found with numpy, cached on disk), Parquet is read one row group at a time.

Everything is deterministic from the seed, and the iterator's position (`get_state`) goes
into every checkpoint.
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import json
import os
import sysconfig
import threading
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from ..config import Config
from . import synthetic

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".text", ""}


class DataError(ValueError):
    """The data named in the config is missing, empty or unreadable."""


# --------------------------------------------------------------------------- document sources


class TextFiles(grain.sources.RandomAccessDataSource):
    """One document per file."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> str:
        try:
            return self.paths[i].read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise DataError(f"cannot read data file {str(self.paths[i])!r}: {e}") from None


def _text_of(record: Any, where: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        if isinstance(record.get("text"), str):
            return record["text"]
        for v in record.values():
            if isinstance(v, str):
                return v
    raise DataError(f"{where}: no text field in record")


WHITESPACE = np.array([ord(c) for c in " \t\n\r\x0b\x0c"], np.uint8)  # what bytes.strip() strips


def line_spans(path: Path, chunk: int = 1 << 22) -> np.ndarray:
    """int64 [n, 2]: the [start, end) byte offsets of the file's non-blank lines (newline excluded).

    One pass over the file, `chunk` bytes at a time, finds the newlines and each line's first
    byte with numpy; only the rare lines that start with whitespace are read again, one by one,
    to tell blank from not."""
    newlines, firsts = [], []  # firsts: the first byte of every line that starts before the end
    with open(path, "rb") as f:
        size, starts_here = 0, True  # a line starts at the first byte of the next block
        while block := f.read(chunk):
            b = np.frombuffer(block, np.uint8)
            nl = np.flatnonzero(b == ord("\n"))
            newlines.append(nl + size)
            firsts += [b[:1]] if starts_here else []
            firsts.append(b[nl[nl + 1 < len(b)] + 1])
            starts_here = bool(len(nl)) and nl[-1] == len(b) - 1
            size += len(b)
        newlines = np.concatenate(newlines or [np.zeros(0, np.int64)]).astype(np.int64)
        starts = np.concatenate([[0], newlines + 1])
        ends = np.concatenate([newlines, [size]])
        first = np.concatenate(firsts or [np.zeros(0, np.uint8)])
        keep = ends > starts
        keep[:len(first)] &= ~np.isin(first, WHITESPACE)
        for k in np.flatnonzero((ends > starts) & ~keep):  # starts with whitespace: blank?
            f.seek(starts[k])
            keep[k] = bool(f.read(ends[k] - starts[k]).strip())
    return np.stack([starts[keep], ends[keep]], axis=1)


def cache_dir() -> Path:
    """Where indexes of data files are kept: $SEGEXEC_CACHE_DIR, else $XDG_CACHE_HOME/segexec_jax
    (~/.cache/segexec_jax)."""
    if os.environ.get("SEGEXEC_CACHE_DIR"):
        return Path(os.environ["SEGEXEC_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "segexec_jax"


def cached_line_spans(path: Path) -> np.ndarray:
    """`line_spans`, kept in `cache_dir()` under the file's path, size and modification time, so a
    restart (or the validation split, or another process on the host) does not scan the file again."""
    st = path.stat()
    key = hashlib.sha256(f"lines-v1:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:32]
    cached = cache_dir() / "jsonl_index" / f"{key}.npy"
    try:
        return np.load(cached)
    except (OSError, ValueError):
        pass
    spans = line_spans(path)
    try:  # written whole or not at all; a cache we cannot write only costs a scan next time
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f"{key}.{os.getpid()}.{threading.get_ident()}.tmp.npy")
        np.save(tmp, spans)
        os.replace(tmp, cached)
    except OSError:
        pass
    return spans


class JsonlFiles(grain.sources.RandomAccessDataSource):
    """One document per non-blank line: its "text" field (or first string field).

    The line offsets come from `cached_line_spans`; reading a document is one seek."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)
        spans = [cached_line_spans(p) for p in self.paths]
        self.spans = np.concatenate(spans) if spans else np.zeros((0, 2), np.int64)
        self.first = np.cumsum([0] + [len(s) for s in spans]).tolist()  # each file's first document

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, i: int) -> str:
        path = self.paths[bisect.bisect_right(self.first, i) - 1]
        start, end = self.spans[i].tolist()
        try:
            with open(path, "rb") as f:
                f.seek(start)
                line = f.read(end - start)
        except OSError as e:
            raise DataError(f"cannot read data file {str(path)!r}: {e}") from None
        try:
            return _text_of(json.loads(line), f"{path}:{start}")
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: bad JSON line at byte {start}: {e}") from None


PARQUET_CACHE_BYTES = 1 << 30  # decoded row groups kept per Parquet source


class ParquetFiles(grain.sources.RandomAccessDataSource):
    """One document per row of the "text" column (else the first column).

    A document is read with its row group only (a shuffled read costs a row group's decoding:
    about 8 ms for 4 MB of text). Row groups read lately stay decoded, up to `cache_bytes`
    (`PARQUET_CACHE_BYTES`; at least the last one), in a cache that grain's reader threads
    share under a lock; every read opens its own reader, so threads share no reader state."""

    def __init__(self, paths: Sequence[Path], cache_bytes: int | None = None):
        import pyarrow.parquet as pq

        self.paths = list(paths)
        self.cache_bytes = PARQUET_CACHE_BYTES if cache_bytes is None else cache_bytes
        self._meta = [pq.read_metadata(p) for p in self.paths]
        self._column = []
        for meta in self._meta:
            names = meta.schema.to_arrow_schema().names
            self._column.append("text" if "text" in names else names[0])
        self._groups = [(f, g) for f, meta in enumerate(self._meta) for g in range(meta.num_row_groups)]
        rows = [self._meta[f].row_group(g).num_rows for f, g in self._groups]
        self._first = np.cumsum([0] + rows).tolist()  # each row group's first document
        self._cache: OrderedDict[int, Any] = OrderedDict()  # row group -> its decoded column
        self._cached_bytes = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # for worker processes: no lock, no cache
        return {"paths": self.paths, "cache_bytes": self.cache_bytes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["paths"], state["cache_bytes"])

    def __len__(self) -> int:
        return self._first[-1]

    def __getitem__(self, i: int) -> str:
        k = bisect.bisect_right(self._first, i) - 1
        value = self._row_group(k)[i - self._first[k]].as_py()
        if isinstance(value, bytes):
            return value.decode("utf-8", errors="replace")
        return "" if value is None else str(value)

    def _row_group(self, k: int):
        with self._lock:
            column = self._cache.get(k)
            if column is not None:
                self._cache.move_to_end(k)
                return column
        column = self._read_row_group(*self._groups[k])  # outside the lock: threads read in parallel
        with self._lock:
            if k not in self._cache:
                self._cache[k] = column
                self._cached_bytes += column.nbytes
            while len(self._cache) > 1 and self._cached_bytes > self.cache_bytes:
                self._cached_bytes -= self._cache.popitem(last=False)[1].nbytes
        return column

    def _read_row_group(self, f: int, g: int):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            with pq.ParquetFile(self.paths[f], metadata=self._meta[f]) as reader:
                return reader.read_row_group(g, columns=[self._column[f]]).column(0).combine_chunks()
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{self.paths[f]}: cannot read row group {g}: {e}") from None


class ArrayRecordFiles(grain.sources.RandomAccessDataSource):
    """One document per record: UTF-8 text, or JSON with a "text" field."""

    def __init__(self, paths: Sequence[Path]):
        self._source = grain.sources.ArrayRecordDataSource([str(p) for p in paths])

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> str:
        raw = self._source[i]
        text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
        if text.startswith("{"):
            try:
                return _text_of(json.loads(text), f"record {i}")
            except json.JSONDecodeError:
                pass
        return text


def corpus_files() -> list[Path]:
    """The embedded corpus: the Python standard library's own .py files."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)


def expand_files(patterns: Sequence[str]) -> list[Path]:
    out: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True))
        if not matches:
            raise DataError(f"config key 'data.files': {pattern!r} matches no file")
        out += [Path(m) for m in matches if Path(m).is_file()]
    if not out:
        raise DataError("config key 'data.files': the patterns match no readable file")
    return out


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    if suffix in (".array_record", ".arrayrecord") or path.name.endswith(".array_record"):
        return "arrayrecord"
    return "text"


def document_sources(cfg: Config) -> list[grain.sources.RandomAccessDataSource]:
    if not cfg.data.files:
        return [TextFiles(corpus_files())]
    paths = expand_files(cfg.data.files)
    by_kind: dict[str, list[Path]] = {}
    for p in paths:
        by_kind.setdefault(_kind(p), []).append(p)
    make = {"text": TextFiles, "jsonl": JsonlFiles, "parquet": ParquetFiles, "arrayrecord": ArrayRecordFiles}
    try:
        return [make[k](ps) for k, ps in sorted(by_kind.items())]
    except OSError as e:
        raise DataError(f"config key 'data.files': cannot read: {e}") from None
    except DataError:
        raise
    except Exception as e:  # pyarrow / array_record raise their own types on damaged files
        raise DataError(f"config key 'data.files': unreadable data: {e}") from None


def _split_hashes(n: int, salt: str) -> np.ndarray:
    return np.array([zlib.crc32(f"{salt}:{i}".encode()) for i in range(n)], np.uint64)


def has_validation(cfg: Config) -> bool:
    """`data.val_fraction=0` holds out nothing: no validation split, so no evaluation in training."""
    return cfg.data.val_fraction > 0


def _split(sources: Sequence[grain.sources.RandomAccessDataSource], val_fraction: float) -> list[np.ndarray]:
    """Per source, True where a document is held out for validation: a deterministic split by
    hashing each document's index with the source's salt. Where that leaves a split empty (few
    documents), the document with the highest hash goes to training (a lone document always
    trains) and, given two or more, the one with the lowest hash to validation."""
    hashes = [_split_hashes(len(src), f"{type(src).__name__}{k}") for k, src in enumerate(sources)]
    is_val = [h < np.uint64(int(val_fraction * 2**32)) for h in hashes]
    flat = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    where = np.cumsum([0] + [len(h) for h in hashes])

    def move(pick, to_val: bool) -> None:
        j = int(pick(flat))
        k = int(np.searchsorted(where, j, side="right") - 1)
        is_val[k][j - where[k]] = to_val

    if len(flat) and all(v.all() for v in is_val):  # nothing trains
        move(np.argmax, False)
    if val_fraction > 0 and len(flat) >= 2 and not any(v.any() for v in is_val):  # nothing held out
        move(np.argmin, True)
    return is_val


def documents(cfg: Config, split: str) -> grain.MapDataset:
    """The split's documents (strings) of every source, concatenated."""
    where = "the embedded corpus" if not cfg.data.files else ", ".join(cfg.data.files)
    if split == "validation" and not has_validation(cfg):
        raise DataError("no validation documents: config key 'data.val_fraction' is 0, which holds none out "
                        "(set it above 0 for a validation split)")
    sources = document_sources(cfg)
    total = sum(len(source) for source in sources)
    if total == 0:
        raise DataError(f"config key 'data.files': no {split} documents in {where}: the files hold no "
                        "documents (empty, or blank lines only?)")
    if split == "validation" and total == 1:
        raise DataError(f"config key 'data.files': no validation documents in {where}: it holds a single "
                        "document (a text file is one document), so none can be held out. Set "
                        "data.val_fraction=0 to train without validation, or give more documents: several "
                        "files, or JSONL / Parquet with one document per line / row")
    parts = []
    for source, is_val in zip(sources, _split(sources, cfg.data.val_fraction)):
        idx = np.flatnonzero(is_val if split == "validation" else ~is_val)
        if len(idx):
            parts.append(grain.MapDataset.source(idx.tolist()).map(source.__getitem__))
    return parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)


# --------------------------------------------------------------------------- packing


class PackedRows(grain.IterDataset):
    """Rows of T tokens with document ids, packed by the segment rule (module docstring)."""

    def __init__(self, parent: grain.IterDataset, T: int, S: int, whole: bool = False):
        super().__init__(parent)
        self.T, self.S, self.whole = T, S, whole

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), self.T, self.S, self.whole)


class _PackIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, T: int, S: int, whole: bool):
        super().__init__(parent)
        self.T, self.S, self.whole = T, S, whole
        self._doc: np.ndarray | None = None  # the document being placed
        self._doc_state: dict | None = None  # parent state just before that document
        self._used = 0  # its tokens placed in earlier rows

    def _next_document(self) -> None:
        while True:
            state = self._parent.get_state()
            doc = np.asarray(next(self._parent), np.int32)
            if len(doc):
                self._doc, self._doc_state, self._used = doc, state, 0
                return

    def __next__(self) -> dict[str, np.ndarray]:
        T, S = self.T, self.S
        tokens = np.zeros(T, np.int32)
        doc_ids = np.zeros(T, np.int32)
        pos, n_docs = 0, 0
        while pos < T:
            if self._doc is None:
                self._next_document()
            rest = self._doc[self._used:]
            left = -pos % S
            if left and len(rest) > left:  # does not fit in this segment: next boundary
                pos += left
                continue
            if self.whole and pos and len(rest) <= T < pos + len(rest):  # whole, in the next row
                break
            take = min(len(rest), T - pos)
            n_docs += 1
            tokens[pos:pos + take] = rest[:take]
            doc_ids[pos:pos + take] = n_docs
            pos += take
            self._used += take
            if self._used == len(self._doc):
                self._doc = None
        return {"tokens": tokens, "doc_ids": doc_ids}

    def get_state(self) -> dict[str, Any]:
        if self._doc is None:
            return {"parent": self._parent.get_state(), "used": 0, "pending": False}
        return {"parent": self._doc_state, "used": self._used, "pending": True}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._doc = None
        if state["pending"]:
            self._next_document()
            self._used = int(state["used"])
            if not 0 <= self._used < len(self._doc):  # else __next__ would never finish a row
                raise DataError(f"the saved data position ({self._used} tokens into a document of "
                                f"{len(self._doc)}) does not fit this data: saved by another process, or "
                                "with other data settings?")


# --------------------------------------------------------------------------- the pipeline


def _mean_length(docs: grain.MapDataset, sample: int = 64) -> float:
    """Mean document length in characters, from an evenly spaced sample."""
    idx = np.linspace(0, len(docs) - 1, min(sample, len(docs))).astype(int)
    return float(np.mean([len(docs[int(i)]) for i in idx])) or 1.0


def _synthetic_docs(task: str, seed: int, chars: int, fractions: tuple[float, float]) -> grain.MapDataset:
    """Training documents of `task`, document i about `chars` times a fraction drawn (from the
    seed and i) uniformly in `fractions` characters long."""
    def make(i: int) -> str:
        f = np.random.default_rng([seed, i, 0x5EC]).uniform(*fractions)
        return synthetic.generate(task, seed, i, int(chars * f), "train").text
    return grain.MapDataset.range(2**40).map(lambda i: make(int(i)))


def dataset(cfg: Config, tokenizer, split: str = "train", batch_size: int | None = None,
            process_index: int = 0, process_count: int = 1, seed: int | None = None) -> grain.IterDataset:
    """Batches {"tokens": int32 [b, T], "doc_ids": int32 [b, T]} for this process.

    Training reshuffles every epoch from `train.seed` and mixes in the synthetic tasks
    (`data.synthetic`: task -> share of the training tokens);
    validation reads documents in a fixed order. Each process reads a disjoint slice.
    """
    T, S = cfg.train.seq_len, cfg.segment.len
    seed = cfg.train.seed if seed is None else seed
    b = batch_size if batch_size is not None else cfg.train.batch_size // process_count
    docs = documents(cfg, split)
    if split == "train":
        weights = {k: float(w) for k, w in cfg.data.synthetic.items() if w > 0}
        chars = T * (1 if cfg.data.tokenizer == "bytes" else 4)  # synthetic documents of up to about T tokens
        lo, hi = cfg.data.synthetic_length
        corpus_chars = _mean_length(docs)
        docs = docs.shuffle(seed=seed).repeat(None)
        if weights:
            # weights are shares of training tokens: sample documents in proportion to
            # share / mean document length
            parts = [docs] + [_synthetic_docs(task, seed, chars, (lo, hi)) for task in weights]
            shares = [1.0 - sum(weights.values())] + list(weights.values())
            lengths = [corpus_chars] + [chars * (lo + hi) / 2] * len(weights)
            keep = [i for i, w in enumerate(shares) if w > 0]
            docs = grain.MapDataset.mix([parts[i] for i in keep], [shares[i] / lengths[i] for i in keep])
    else:
        docs = docs.repeat(None)
    docs = docs[process_index::process_count]
    tokens = docs.map(lambda text: np.asarray(tokenizer.encode(text), np.int32))
    rows = PackedRows(tokens.to_iter_dataset(), T, S, cfg.data.whole_documents)
    return rows.batch(b, drop_remainder=True)


def prefetch(ds: grain.IterDataset, buffer: int = 4) -> grain.IterDataset:
    """Produce batches on a background thread; the iterator state stays exact."""
    return grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=buffer)
