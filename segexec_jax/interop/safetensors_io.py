"""Streaming safetensors reading and writing: one tensor in memory at a time.

The format is an 8-byte little-endian header length, a JSON header mapping each name to
{dtype, shape, data_offsets}, then the raw bytes. Reading seeks to one tensor and reads
only its bytes (no memory map that would keep the whole file resident); writing lays out
the header from the names, dtypes and shapes first and then appends each tensor as it is
produced.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
    pass


def read_header(path: str | Path) -> tuple[dict, int]:
    """(header without __metadata__, byte offset of the data section)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise SafetensorsError(f"{path}: not a safetensors file (header of {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{path}: damaged header: {e}") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def read_tensor(path: str | Path, name: str, header: dict | None = None, start: int | None = None) -> np.ndarray:
    if header is None or start is None:
        header, start = read_header(path)
    if name not in header:
        raise SafetensorsError(f"{path}: no tensor {name!r}")
    info = header[name]
    if info["dtype"] not in DTYPES:
        raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    begin, end = info["data_offsets"]
    with open(path, "rb") as f:
        f.seek(start + begin)
        buf = f.read(end - begin)
    if len(buf) != end - begin:
        raise SafetensorsError(f"{path}: tensor {name!r} is truncated")
    return np.frombuffer(buf, dtype=DTYPES[info["dtype"]]).reshape(info["shape"])


class Reader:
    """Tensors of one safetensors file or of a sharded set (with its index.json)."""

    def __init__(self, files: list[Path]):
        self.where: dict[str, tuple[Path, dict, int]] = {}
        for f in files:
            header, start = read_header(f)
            for name in header:
                self.where[name] = (f, header, start)

    @classmethod
    def open(cls, directory: str | Path, stem: str = "model") -> Reader:
        d = Path(directory)
        index = d / f"{stem}.safetensors.index.json"
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as e:
                raise SafetensorsError(f"{index}: damaged index: {e}") from None
            return cls([d / f for f in files])
        single = d / f"{stem}.safetensors"
        if single.is_file():
            return cls([single])
        found = sorted(d.glob("*.safetensors"))
        if not found:
            raise SafetensorsError(f"no {stem}.safetensors (or index) in {d}")
        return cls(found)

    def names(self) -> list[str]:
        return list(self.where)

    def info(self, name: str) -> dict:
        return self.where[name][1][name]

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.where:
            raise SafetensorsError(f"missing tensor {name!r}")
        f, header, start = self.where[name]
        return read_tensor(f, name, header, start)


def write(directory: str | Path, stem: str, specs: list[tuple[str, np.dtype, tuple[int, ...]]],
          tensors: Iterable[np.ndarray], max_shard_bytes: int | None = None,
          metadata: dict | None = None) -> list[Path]:
    """Write tensors (produced in `specs` order) into `stem.safetensors`, or into shards
    `stem-0000i-of-0000n.safetensors` plus `stem.safetensors.index.json`."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    sizes = [int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize for _, dt, shape in specs]
    groups: list[list[int]] = [[]]
    total = 0
    for i, size in enumerate(sizes):
        if max_shard_bytes and groups[-1] and total + size > max_shard_bytes:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += size
    names = ([f"{stem}.safetensors"] if len(groups) == 1 else
             [f"{stem}-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))])
    it: Iterator[np.ndarray] = iter(tensors)
    weight_map = {}
    for fname, group in zip(names, groups):
        header: dict = {"__metadata__": {k: str(v) for k, v in (metadata or {}).items()}}
        offset = 0
        for i in group:
            name, dt, shape = specs[i]
            if np.dtype(dt) not in CODES:
                raise SafetensorsError(f"tensor {name!r}: unsupported dtype {dt}")
            header[name] = {"dtype": CODES[np.dtype(dt)], "shape": list(shape), "data_offsets": [offset, offset + sizes[i]]}
            offset += sizes[i]
            weight_map[name] = fname
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with open(d / fname, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for i in group:
                name, dt, shape = specs[i]
                arr = np.ascontiguousarray(next(it), dtype=dt)
                if arr.shape != tuple(shape):
                    raise SafetensorsError(f"tensor {name!r}: shape {arr.shape}, declared {tuple(shape)}")
                f.write(arr.reshape(-1).view(np.uint8).data)  # no copy
                del arr
    if len(groups) > 1:
        index = {"metadata": {"total_size": int(sum(sizes))}, "weight_map": weight_map}
        (d / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return [d / n for n in names]
