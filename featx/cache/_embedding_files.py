"""Cached embeddings out of featx, in formats other tools read, row for row with their
metadata (path, label, split, sha256).

- ``npy``: ``embeddings.npy`` (float32, rows x dim) and ``metadata.csv``;
- ``csv``: ``embeddings.csv``, the metadata columns then ``e0 .. e{dim-1}``;
- ``parquet``: ``embeddings.parquet``, the metadata columns and ``embedding`` (a fixed-size
  list of float32), through pyarrow (``pip install 'featx[parquet]'``).

Every format also writes ``export.json`` (which cache, backbone key, precision, counts).
Rows are read and written ``chunk_rows`` at a time, so memory stays flat whatever the
cache's size; files are written under temporary names and renamed when complete
(:func:`featx._io.atomic_path`), so a failed export leaves no half-written file.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
from pathlib import Path

import numpy as np

from featx._io import atomic_path, to_json, write_text_atomic
from featx.base import Result
from featx.errors import UsageError

from ._index import FeatureCache

EXPORT_FORMATS = ("npy", "parquet", "csv")
CHUNK_ROWS = 4096
METADATA_COLUMNS = ("path", "label", "split", "sha256")


@dataclasses.dataclass
class EmbeddingExport(Result):
    """What ``featx cache export`` wrote (``export.json`` holds the same, ``out`` aside)."""

    cache: str
    root: str
    format: str
    files: list  # file names in ``out``
    n_rows: int
    dim: int
    columns: list
    includes_augmented_views: bool
    backbone: str
    weights_id: str
    precision: str
    key: dict
    class_names: list
    out: str


def export_embeddings(cache_path, format: str, out_dir, *, views: bool = False,
                      chunk_rows: int = CHUNK_ROWS) -> EmbeddingExport:
    """Write the cache's embeddings and metadata to ``out_dir``; return what was written.

    ``views``: also the augmented views' rows (with a ``view`` column; 0 is the image).
    Reads ``chunk_rows`` rows of the cache at a time.
    """
    if format not in EXPORT_FORMATS:
        raise UsageError(f"unknown format {format!r}; one of {', '.join(EXPORT_FORMATS)}")
    out_dir = Path(out_dir)
    with FeatureCache.open(cache_path) as cache:
        views_column = np.asarray(cache.h5["view"][:cache.n_rows])
        wanted = views_column >= 0 if views else views_column == 0
        columns = list(METADATA_COLUMNS) + (["view"] if views else [])
        writer = WRITERS[format](int(wanted.sum()), cache.dim, columns)
        out_dir.mkdir(parents=True, exist_ok=True)
        classes = cache.json_attr("class_names", [])
        _write_rows(cache, writer, out_dir, wanted, chunk_rows, views, classes)
        record = EmbeddingExport(
            cache=str(cache.path), root=cache.attr("root"), format=format,
            files=list(writer.names), n_rows=int(wanted.sum()), dim=cache.dim, columns=columns,
            includes_augmented_views=views, backbone=cache.attr("backbone"),
            weights_id=cache.attr("weights_id"), precision=cache.key.get("precision", "fp32"),
            key=cache.key, class_names=classes, out=str(out_dir))
    written = {k: v for k, v in record.to_dict().items() if k != "out"}
    write_text_atomic(out_dir / "export.json", to_json(written, indent=2) + "\n")
    return record


def _write_rows(cache, writer, out_dir, wanted, chunk_rows, views, classes) -> None:
    """The wanted rows, chunk by chunk, into the writer's files (renamed into place when
    every row is written; removed if anything fails)."""
    with contextlib.ExitStack() as stack:
        paths = [stack.enter_context(atomic_path(out_dir / name)) for name in writer.names]
        with writer.open(paths):
            for start in range(0, cache.n_rows, chunk_rows):
                rows, embeddings = cache.row_range(start, start + chunk_rows)
                keep = wanted[start:start + len(embeddings)]
                if keep.any():
                    writer.write(_metadata(rows, keep, classes, views), embeddings[keep])


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
    """Writes row chunks to its files: ``open(paths)`` (a context: files closed at its end),
    then ``write(table, embeddings)`` per chunk. ``names``: the files it writes."""

    names: tuple = ()

    def __init__(self, n_rows: int, dim: int, columns: list):
        self.n_rows, self.dim, self.columns = n_rows, dim, columns

    @contextlib.contextmanager
    def open(self, paths):
        with contextlib.ExitStack() as files:
            self._files = files
            self.start(paths)
            yield self

    def _text(self, path):
        return self._files.enter_context(open(path, "w", newline="", encoding="utf-8"))


class NpyWriter(_Writer):
    """``embeddings.npy`` written as a header then rows, in order (no memory map, so a full
    disk is an OSError, not a crash), and ``metadata.csv``."""

    names = ("embeddings.npy", "metadata.csv")

    def start(self, paths) -> None:
        self.array = self._files.enter_context(open(paths[0], "wb"))
        np.lib.format.write_array_header_1_0(
            self.array, {"descr": "<f4", "fortran_order": False,
                         "shape": (self.n_rows, self.dim)})
        self.csv = csv.writer(self._text(paths[1]))
        self.csv.writerow(self.columns)

    def write(self, table: dict, embeddings: np.ndarray) -> None:
        self.array.write(np.ascontiguousarray(embeddings, "<f4").tobytes())
        self.csv.writerows(zip(*(table[c] for c in self.columns)))


class CsvWriter(_Writer):
    names = ("embeddings.csv",)

    def start(self, paths) -> None:
        self.csv = csv.writer(self._text(paths[0]))
        self.csv.writerow([*self.columns, *(f"e{i}" for i in range(self.dim))])

    def write(self, table: dict, embeddings: np.ndarray) -> None:
        for meta, row in zip(zip(*(table[c] for c in self.columns)), embeddings):
            self.csv.writerow([*meta, *(format(float(v), ".9g") for v in row)])


class ParquetWriter(_Writer):
    names = ("embeddings.parquet",)

    def __init__(self, n_rows, dim, columns):
        super().__init__(n_rows, dim, columns)
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise UsageError("parquet export needs pyarrow: pip install 'featx[parquet]' "
                             "(or use --format npy or csv)") from None
        self.pa, self.pq = pa, pq
        fields = [pa.field(c, pa.int16() if c == "view" else pa.string()) for c in columns]
        self.schema = pa.schema([*fields, pa.field("embedding", pa.list_(pa.float32(), dim))])

    def start(self, paths) -> None:
        self.writer = self._files.enter_context(self.pq.ParquetWriter(paths[0], self.schema))

    def write(self, table: dict, embeddings: np.ndarray) -> None:
        pa = self.pa
        flat = pa.array(np.ascontiguousarray(embeddings, np.float32).ravel())
        arrays = [pa.array(table[c], type=self.schema.field(c).type) for c in self.columns]
        arrays.append(pa.FixedSizeListArray.from_arrays(flat, self.dim))
        self.writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema))


WRITERS = {"npy": NpyWriter, "csv": CsvWriter, "parquet": ParquetWriter}
