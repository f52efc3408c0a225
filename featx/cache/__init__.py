"""The second room of an image's route: its embedding, stored once and read by every later
stage. One cache per (dataset folder, backbone key): an HDF5 index over immutable shards,
written crash-safely, reconciled with the folder on every run.

Modules, in import order: ``_key`` (names and keys), ``_shards`` (the files holding
embeddings), ``_index`` (reading the index), ``_session`` (writing it), ``_maintenance``
(the ``featx cache`` commands), ``reconcile`` (a folder against its cache; imported by
name: ``from featx.cache import reconcile``), ``_features`` and ``_combined`` (the rows
later stages read), ``_embedding_files`` (embeddings out as npy, csv or parquet).
"""

from . import reconcile
from ._combined import CombinedFeatures
from ._embedding_files import EXPORT_FORMATS, EmbeddingExport, export_embeddings
from ._features import ExtractStats, Features
from ._index import CACHE_FORMAT_VERSION, ROW_FIELDS, FeatureCache, validate
from ._key import (FLIP_KEY, INT8_KEY, RUN_KEY_FIELDS, backbone_part, cache_path_for,
                   int8_run_key, key_hash, key_variant, parts_dir, run_key, shard_dir)
from ._maintenance import (CacheSummary, CompactResult, InvalidCache, VerifyResult, cache_info,
                           compact_cache, list_caches, remove_cache, summary, verify_cache)
from ._session import CacheLock, CacheSession, part_id
from ._shards import DONE_SUFFIX, ShardInfo, is_intact, read_rows, write_shard

__all__ = [
    "CACHE_FORMAT_VERSION", "CacheLock", "CacheSession", "CacheSummary", "CombinedFeatures",
    "CompactResult", "DONE_SUFFIX", "EXPORT_FORMATS", "EmbeddingExport", "ExtractStats",
    "FLIP_KEY", "FeatureCache", "Features", "INT8_KEY", "InvalidCache", "ROW_FIELDS",
    "RUN_KEY_FIELDS", "ShardInfo", "VerifyResult", "backbone_part", "cache_info",
    "cache_path_for", "compact_cache", "export_embeddings", "int8_run_key", "is_intact", "key_hash",
    "key_variant", "list_caches", "part_id", "parts_dir", "read_rows", "reconcile", "remove_cache",
    "run_key", "shard_dir", "summary", "validate", "verify_cache", "write_shard",
]
