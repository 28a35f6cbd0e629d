"""Documents per second from a large JSONL and Parquet file, read in shuffled order.

    python benchmarks/data_throughput.py --make --dir /tmp/segexec_data   # writes ~1 GB files once
    python benchmarks/data_throughput.py --dir /tmp/segexec_data --seconds 30

For each file (or set of files): the time to open it as a document source
(`data.document_sources`: the JSONL line index, the Parquet footers), first with an empty index
cache and again with the cache it left, then documents read in a random permutation of all
indices (what a shuffled epoch does) for `--seconds`, on `--threads` threads (grain's map reads
from several). Prints one JSON line per measurement. To measure another tree of the code, put
it first on the path: `PYTHONPATH=/tmp/old python benchmarks/data_throughput.py ...`.
A rate covers the cache's warm-up: a whole shuffled epoch when it ends within `--seconds`.

Measured (2 CPU cores, files in the page cache, 249,710 documents, row groups of 1,000 rows,
`--seconds 30`), documents/s on 1 thread / 4 threads, before (27c6b6e) -> after:
  JSONL 1 GB               27,900 / 13,800 -> 31,400 / 27,600; open 2.4 s -> 0.7-1.2 s (0.01 s cached)
  Parquet 1 GB, one file   27,700 (3.8 GB RSS) -> 13,800 / 22,500 (1.5 GB RSS; 101 / 159 with a 256 MiB cache)
  Parquet 1 GB, 8 files    2.8 / 2.3 -> 18,400 / 44,100
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

SIZE = 1 << 30  # bytes of text per file
SHARDS = 8  # the Parquet data once more, as this many files
FILES = {"jsonl": "docs.jsonl", "parquet": "docs.parquet", "parquet-shards": "shards/*.parquet"}


def make(folder: Path, size: int, rows_per_group: int, seed: int = 0) -> None:
    """Documents of 200 to 20,000 characters (log-uniform, mean about 4 KB) cut from random text,
    as JSONL, and as Parquet with row groups of `rows_per_group` rows: one file, and `SHARDS` files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 10))) for _ in range(5000)]
    base = " ".join(rng.choice(words, 2_000_000))
    docs, total = [], 0
    while total < size:
        n = int(np.exp(rng.uniform(np.log(200), np.log(20_000))))
        start = int(rng.integers(0, len(base) - n))
        docs.append(base[start:start + n])
        total += n
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "docs.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    table = pa.table({"text": docs})
    pq.write_table(table, folder / "docs.parquet", row_group_size=rows_per_group)
    (folder / "shards").mkdir(exist_ok=True)
    for k, rows in enumerate(np.array_split(np.arange(len(docs)), SHARDS)):
        pq.write_table(table.slice(rows[0], len(rows)), folder / "shards" / f"docs-{k:05d}.parquet",
                       row_group_size=rows_per_group)
    print(json.dumps({"documents": len(docs), "text_bytes": total, "rows_per_group": rows_per_group,
                      "jsonl_bytes": (folder / "docs.jsonl").stat().st_size,
                      "parquet_bytes": (folder / "docs.parquet").stat().st_size}))


def measure(pattern: str, seconds: float, threads: int, parquet_cache_mb: int | None, seed: int = 0) -> dict:
    from segexec_jax.config import load_config
    from segexec_jax.data import pipeline as data

    if parquet_cache_mb is not None:
        data.PARQUET_CACHE_BYTES = parquet_cache_mb << 20

    cfg = load_config("tiny", [f"data.files=['{pattern}']"])
    opened = []
    with tempfile.TemporaryDirectory() as cache:
        os.environ["SEGEXEC_CACHE_DIR"] = cache
        for _ in range(2):  # the first builds the index, the second finds it cached
            t0 = time.perf_counter()
            (source,) = data.document_sources(cfg)
            opened.append(round(time.perf_counter() - t0, 2))
    order = np.random.default_rng(seed).permutation(len(source))
    deadline = time.perf_counter() + seconds

    def read(lane: int) -> tuple[int, int]:  # documents, characters
        docs = chars = 0
        for i in order[lane::threads]:
            if time.perf_counter() > deadline:
                break
            chars += len(source[int(i)])
            docs += 1
        return docs, chars

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        counts = np.sum(list(pool.map(read, range(threads))), axis=0)
    elapsed = time.perf_counter() - t0
    return {"files": pattern, "parquet_cache_mb": getattr(data, "PARQUET_CACHE_BYTES", 0) >> 20,
            "documents": len(source), "open_s": opened[0], "reopen_s": opened[1], "threads": threads,
            "read": int(counts[0]), "docs_per_s": round(counts[0] / elapsed, 1),
            "text_mb_per_s": round(counts[1] / elapsed / 1e6, 2),
            "peak_rss_mb_so_far": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path("/tmp/segexec_data"))
    p.add_argument("--make", action="store_true", help="write the files first")
    p.add_argument("--size", type=int, default=SIZE, help="bytes of text per file (with --make)")
    p.add_argument("--rows-per-group", type=int, default=1000, help="Parquet row group size (with --make)")
    p.add_argument("--seconds", type=float, default=30.0, help="reading time per measurement")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 4])
    p.add_argument("--parquet-cache-mb", type=int, help="decoded row groups kept (default: data.PARQUET_CACHE_BYTES)")
    p.add_argument("--formats", nargs="+", default=list(FILES), choices=list(FILES))
    args = p.parse_args()
    if args.make:
        make(args.dir, args.size, args.rows_per_group)
    for fmt in args.formats:
        for threads in args.threads:
            print(json.dumps(measure(str(args.dir / FILES[fmt]), args.seconds, threads, args.parquet_cache_mb)), flush=True)


if __name__ == "__main__":
    main()
