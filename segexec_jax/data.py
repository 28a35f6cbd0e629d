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

Everything is deterministic from the seed, and the iterator's position (`get_state`) goes
into every checkpoint.
"""

from __future__ import annotations

import glob
import json
import sysconfig
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from . import synthetic
from .config import Config

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


class JsonlFiles(grain.sources.RandomAccessDataSource):
    """One document per non-empty line: its "text" field (or first string field)."""

    def __init__(self, paths: Sequence[Path]):
        self.index: list[tuple[Path, int]] = []
        for p in paths:
            offset = 0
            with open(p, "rb") as f:
                for line in f:
                    if line.strip():
                        self.index.append((p, offset))
                    offset += len(line)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> str:
        path, offset = self.index[i]
        with open(path, "rb") as f:
            f.seek(offset)
            line = f.readline()
        try:
            return _text_of(json.loads(line), f"{path}:{offset}")
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: bad JSON line at byte {offset}: {e}") from None


class ParquetFiles(grain.sources.RandomAccessDataSource):
    """One document per row of the "text" column (files are read whole, one at a time)."""

    def __init__(self, paths: Sequence[Path]):
        import pyarrow.parquet as pq

        self.paths = list(paths)
        self.offsets = np.cumsum([0] + [pq.ParquetFile(p).metadata.num_rows for p in self.paths])
        self._cache: tuple[int, list] | None = None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> str:
        import pyarrow.parquet as pq

        f = int(np.searchsorted(self.offsets, i, side="right") - 1)
        if self._cache is None or self._cache[0] != f:
            table = pq.read_table(self.paths[f])
            column = "text" if "text" in table.column_names else table.column_names[0]
            self._cache = (f, table.column(column).to_pylist())
        return str(self._cache[1][i - int(self.offsets[f])])


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


def split_indices(n: int, val_fraction: float, split: str, salt: str) -> np.ndarray:
    """A deterministic split by hashing each document's index (with the source's salt)."""
    h = np.array([zlib.crc32(f"{salt}:{i}".encode()) for i in range(n)], np.uint64)
    is_val = h < np.uint64(int(val_fraction * 2**32))
    return np.flatnonzero(is_val if split == "validation" else ~is_val)


def documents(cfg: Config, split: str) -> grain.MapDataset:
    """The split's documents (strings) of every source, concatenated."""
    parts = []
    for k, source in enumerate(document_sources(cfg)):
        idx = split_indices(len(source), cfg.data.val_fraction, split, salt=f"{type(source).__name__}{k}")
        if len(idx):
            parts.append(grain.MapDataset.source(idx.tolist()).map(source.__getitem__))
    if not parts:
        where = "the embedded corpus" if not cfg.data.files else ", ".join(cfg.data.files)
        raise DataError(f"config key 'data.files': no {split} documents in {where}")
    return parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)


# --------------------------------------------------------------------------- packing


class PackedRows(grain.IterDataset):
    """Rows of T tokens with document ids, packed by the segment rule (module docstring)."""

    def __init__(self, parent: grain.IterDataset, T: int, S: int):
        super().__init__(parent)
        self.T, self.S = T, S

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), self.T, self.S)


class _PackIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, T: int, S: int):
        super().__init__(parent)
        self.T, self.S = T, S
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


def _synthetic_docs(task: str, seed: int, length: int) -> grain.MapDataset:
    return grain.MapDataset.range(2**40).map(lambda i: synthetic.generate(task, seed, int(i), length, "train").text)


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
        chars = T * (1 if cfg.data.tokenizer == "bytes" else 4)  # synthetic documents of about T tokens
        corpus_chars = _mean_length(docs)
        docs = docs.shuffle(seed=seed).repeat(None)
        if weights:
            # weights are shares of training tokens: sample documents in proportion to
            # share / mean document length
            parts = [docs] + [_synthetic_docs(task, seed, chars) for task in weights]
            shares = [1.0 - sum(weights.values())] + list(weights.values())
            lengths = [corpus_chars] + [float(chars)] * len(weights)
            keep = [i for i, w in enumerate(shares) if w > 0]
            docs = grain.MapDataset.mix([parts[i] for i in keep], [shares[i] / lengths[i] for i in keep])
    else:
        docs = docs.repeat(None)
    docs = docs[process_index::process_count]
    tokens = docs.map(lambda text: np.asarray(tokenizer.encode(text), np.int32))
    rows = PackedRows(tokens.to_iter_dataset(), T, S)
    return rows.batch(b, drop_remainder=True)


def prefetch(ds: grain.IterDataset, buffer: int = 4) -> grain.IterDataset:
    """Produce batches on a background thread; the iterator state stays exact."""
    return grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=buffer)
