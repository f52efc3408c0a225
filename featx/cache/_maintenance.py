"""What the ``featx cache`` commands do: list caches, describe one, verify every byte of its
shards, compact it, remove it. Each returns a typed result (:class:`featx.base.Result`)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from featx.base import Result
from featx.errors import CacheError

from ._index import FeatureCache
from ._key import key_variant, parts_dir, shard_dir
from ._session import CacheLock, CacheSession


@dataclasses.dataclass
class CacheSummary(Result):
    """One cache as ``featx cache ls`` lists it; ``featx cache info`` adds the last three."""

    cache: str
    root: str
    backbone: str
    weights: str
    weights_id: str
    dim: int
    n_images: int
    n_augmented: int
    n_failed: int
    splits: dict
    class_names: list
    key: dict
    variant: str
    featx_version: str
    created: str
    updated: str
    size_bytes: int
    format: int
    n_shards: int
    failed: list | None = None  # [{"path", "reason"}]
    split_params: dict | None = None
    preprocessing: dict | None = None
    _optional = ("failed", "split_params", "preprocessing")


@dataclasses.dataclass
class InvalidCache(Result):
    """A file under the cache folder that is not a readable cache, and why."""

    cache: str
    error: str


@dataclasses.dataclass
class CompactResult(Result):
    cache: str
    rows: int
    shards_before: int
    shards_after: int
    bytes_before: int
    bytes_after: int
    rows_dropped_damaged: int


@dataclasses.dataclass
class VerifyResult(Result):
    cache: str
    format: int
    rows: int
    shards: int
    damaged: list  # names of the shards that fail their checksum

    def raise_if_damaged(self) -> None:
        """CacheError (exit code 2) naming the damaged shards and what to do."""
        if self.damaged:
            raise CacheError(
                f"{self.cache}: {len(self.damaged)} of {self.shards} shards damaged "
                f"({', '.join(self.damaged)}); `featx cache compact` drops their rows, then "
                "`featx extract` extracts them again")


def summary(cache: FeatureCache) -> CacheSummary:
    rows = cache.rows()
    views = rows["view"]
    splits = rows["split"][views == 0]
    return CacheSummary(
        cache=str(cache.path), root=cache.attr("root"), backbone=cache.attr("backbone"),
        weights=cache.attr("weights"), weights_id=cache.attr("weights_id"), dim=cache.dim,
        n_images=int((views == 0).sum()), n_augmented=int((views > 0).sum()),
        n_failed=len(cache.failed()),
        splits={name: int((splits == name).sum()) for name in ("train", "val", "test")},
        class_names=cache.json_attr("class_names", []), key=cache.key,
        variant=key_variant(cache.key), featx_version=cache.attr("featx_version"),
        created=cache.attr("created"), updated=cache.attr("updated"),
        size_bytes=cache.size_bytes(), format=cache.version, n_shards=len(cache.shards))


def cache_info(path) -> CacheSummary:
    """``featx cache info``: the summary plus the failed files, split and preprocessing."""
    with FeatureCache.open(path) as cache:
        info = summary(cache)
        info.failed = [{"path": p, "reason": r} for p, _, r in cache.failed()]
        info.split_params = cache.json_attr("split_params")
        info.preprocessing = cache.json_attr("preprocessing")
    return info


def list_caches(cache_dir) -> list[CacheSummary | InvalidCache]:
    """Summaries of every cache file under ``cache_dir`` (invalid files are listed as such)."""
    out = []
    for path in sorted(Path(cache_dir).glob("**/*.h5")):
        if path.parent.name.endswith(".shards"):
            continue
        try:
            with FeatureCache.open(path) as cache:
                out.append(summary(cache))
        except CacheError as exc:
            out.append(InvalidCache(str(path), str(exc)))
    return out


def compact_cache(path) -> CompactResult:
    """``featx cache compact``: a cache's rows rewritten into full shards, space freed."""
    path = Path(path)
    with CacheLock(path):
        CacheSession.recover(path)
        session = CacheSession(path, key=None)
        try:
            return CompactResult(**session.compact())
        finally:
            session.close()


def verify_cache(path) -> VerifyResult:
    """``featx cache verify``: every shard re-hashed against the checksum the index holds."""
    with FeatureCache.open(path) as cache:
        damaged = cache.damaged_shards(full=True)
        return VerifyResult(str(path), cache.version, cache.n_rows, len(cache.shards),
                            [cache.shards[i].name for i in damaged])


def remove_cache(cache_path) -> None:
    """Delete a cache: its index, shards and part files."""
    cache_path = Path(cache_path)
    cache_path.unlink(missing_ok=True)
    for folder in (shard_dir(cache_path), parts_dir(cache_path)):
        shutil.rmtree(folder, ignore_errors=True)
