"""Cached embeddings out of featx, in formats other tools read, row for row with their
metadata (path, label, split, sha256).

- ``npy``: ``embeddings.npy`` (float32, rows x dim) and ``metadata.csv``;
- ``csv``: ``embeddings.csv``, the metadata columns then ``e0 .. e{dim-1}``;
- ``parquet``: ``embeddings.parquet``, the metadata columns and ``embedding`` (a fixed-size
  list of float32), through pyarrow (``pip install 'featx[parquet]'``).

Every format also writes ``export.json`` (which cache, backbone key, precision, counts).
Rows are read and written ``chunk_rows`` at a time, so memory stays flat whatever the
cache's size; files are written under temporary names and renamed when complete.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np

from featx._json import json_default
from featx.cache import FeatureCache
from featx.errors import UsageError
from featx.persist import write_atomic

EXPORT_FORMATS = ("npy", "parquet", "csv")
CHUNK_ROWS = 4096
METADATA_COLUMNS = ("path", "label", "split", "sha256")


def export_embeddings(cache_path, format: str, out_dir, *, views: bool = False,
                      chunk_rows: int = CHUNK_ROWS) -> dict:
    """Write the cache's embeddings and metadata to ``out_dir``; return what was written.

    ``views``: also the augmented views' rows (with a ``view`` column; 0 is the image).
    Reads ``chunk_rows`` rows of the cache at a time.
    """
    if format not in EXPORT_FORMATS:
        raise UsageError(f"unknown format {format!r}; one of {', '.join(EXPORT_FORMATS)}")
    writer_class = {"npy": NpyWriter, "csv": CsvWriter, "parquet": ParquetWriter}[format]
    out_dir = Path(out_dir)
    with FeatureCache.open(cache_path) as cache:
        n_rows = cache.n_rows
        wanted = np.asarray(cache.h5["view"][:n_rows]) >= 0 if views else (
            np.asarray(cache.h5["view"][:n_rows]) == 0)
        classes = cache.json_attr("class_names", [])
        columns = list(METADATA_COLUMNS) + (["view"] if views else [])
        out_dir.mkdir(parents=True, exist_ok=True)
        writer = None
        try:
            writer = writer_class(out_dir, int(wanted.sum()), cache.dim, columns)
            writer.start()
            for start in range(0, n_rows, chunk_rows):
                rows, embeddings = cache.row_range(start, start + chunk_rows)
                keep = wanted[start:start + len(embeddings)]
                if keep.any():
                    writer.write(_metadata(rows, keep, classes, views), embeddings[keep])
            files = writer.finish()
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        record = {
            "cache": str(cache.path), "root": cache.attr("root"), "format": format,
            "files": [f.name for f in files], "n_rows": int(wanted.sum()), "dim": cache.dim,
            "columns": columns, "includes_augmented_views": views,
            "backbone": cache.attr("backbone"), "weights_id": cache.attr("weights_id"),
            "precision": cache.key.get("precision", "fp32"), "key": cache.key,
            "class_names": classes,
        }
    text = json.dumps(record, indent=2, default=json_default) + "\n"
    write_atomic(out_dir / "export.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return {**record, "out": str(out_dir)}


def _metadata(rows, keep, classes, views) -> dict:
    labels = rows["labels"][keep]
    table = {"path": rows["paths"][keep].tolist(),
             "label": [classes[int(i)] if 0 <= i < len(classes) else str(i) for i in labels],
             "split": rows["split"][keep].tolist(),
             "sha256": rows["sha256"][keep].tolist()}
    if views:
        table["view"] = rows["view"][keep].astype(int).tolist()
    return table


class _Writer:
    """Writes chunks to temporary files: ``start`` opens them, ``write`` appends a chunk,
    ``finish`` renames them into place, ``abort`` removes them."""

    names: tuple = ()

    def __init__(self, out_dir: Path, n_rows: int, dim: int, columns: list):
        self.n_rows, self.dim, self.columns = n_rows, dim, columns
        self.final = [out_dir / name for name in self.names]
        self.tmp = [p.with_name(f".{p.name}.tmp{os.getpid()}") for p in self.final]
        self.files = []  # open file objects, closed by close()

    def _open(self, index: int, mode: str):
        handle = open(self.tmp[index], mode, **({} if "b" in mode else
                                                {"newline": "", "encoding": "utf-8"}))
        self.files.append(handle)
        return handle

    def finish(self) -> list[Path]:
        self.close()
        for tmp, final in zip(self.tmp, self.final):
            os.replace(tmp, final)
        return self.final

    def abort(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - the error that made us abort is the one to raise
            pass
        for tmp in self.tmp:
            tmp.unlink(missing_ok=True)

    def close(self) -> None:
        for handle in self.files:
            handle.close()


class NpyWriter(_Writer):
    """``embeddings.npy`` written as a header then rows, in order (no memory map, so a full
    disk is an OSError, not a crash), and ``metadata.csv``."""

    names = ("embeddings.npy", "metadata.csv")

    def start(self) -> None:
        self.array = self._open(0, "wb")
        np.lib.format.write_array_header_1_0(
            self.array, {"descr": "<f4", "fortran_order": False,
                         "shape": (self.n_rows, self.dim)})
        self.csv = csv.writer(self._open(1, "w"))
        self.csv.writerow(self.columns)

    def write(self, table: dict, embeddings: np.ndarray) -> None:
        self.array.write(np.ascontiguousarray(embeddings, "<f4").tobytes())
        self.csv.writerows(zip(*(table[c] for c in self.columns)))


class CsvWriter(_Writer):
    names = ("embeddings.csv",)

    def start(self) -> None:
        self.csv = csv.writer(self._open(0, "w"))
        self.csv.writerow([*self.columns, *(f"e{i}" for i in range(self.dim))])

    def write(self, table: dict, embeddings: np.ndarray) -> None:
        for meta, row in zip(zip(*(table[c] for c in self.columns)), embeddings):
            self.csv.writerow([*meta, *(format(float(v), ".9g") for v in row)])


class ParquetWriter(_Writer):
    names = ("embeddings.parquet",)

    def __init__(self, out_dir, n_rows, dim, columns):
        super().__init__(out_dir, n_rows, dim, columns)
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise UsageError("parquet export needs pyarrow: pip install 'featx[parquet]' "
                             "(or use --format npy or csv)") from None
        self.pa, self.pq, self.writer = pa, pq, None
        fields = [pa.field(c, pa.int16() if c == "view" else pa.string()) for c in columns]
        self.schema = pa.schema([*fields, pa.field("embedding", pa.list_(pa.float32(), dim))])

    def start(self) -> None:
        self.writer = self.pq.ParquetWriter(self.tmp[0], self.schema)

    def write(self, table: dict, embeddings: np.ndarray) -> None:
        pa = self.pa
        flat = pa.array(np.ascontiguousarray(embeddings, np.float32).ravel())
        arrays = [pa.array(table[c], type=self.schema.field(c).type) for c in self.columns]
        arrays.append(pa.FixedSizeListArray.from_arrays(flat, self.dim))
        self.writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
