"""What names a cache: the key of its rows (the backbone's key plus how the rows were
computed), the key's digest, and where the cache's files live.

One backbone key (:meth:`featx.backbones.Backbone.key`) can give several kinds of rows:
float16 compute on a GPU, int8 on ONNX Runtime, flip-averaged embeddings. Each kind adds
its *run fields* to the key, so each gets a cache of its own; :func:`backbone_part` takes
them off again to compare a key with a backbone's.
"""

from __future__ import annotations

from pathlib import Path

from featx._io import json_sha256, slug, text_sha256

NAME_FORMAT = 1  # the format in the key hash of file names: caches keep their names
# key fields that say how the rows were computed rather than which backbone computed them
RUN_KEY_FIELDS = ("compute_dtype", "compute_backend", "precision", "quantization",
                  "calibration", "int8_model_sha256", "int8_agreement", "flip_average")
# flip-averaged rows (the mean of an image's and its mirror image's embeddings) are other
# rows: this joins their key
FLIP_KEY = {"flip_average": True}
# int8 rows never share a cache with fp32 rows: this joins the key (and names the file);
# the int8 model's SHA-256 and the calibration sample's identity join it too, once known.
INT8_KEY = {"precision": "int8"}


def run_key(backbone_key: dict, *, compute_backend: str | None = None, int8: bool = False,
            flip_average: bool = False) -> dict:
    """The key of a run's rows: ``backbone_key`` plus what changes how they are computed.

    ``compute_backend``: the Keras backend of float16 (mixed-precision) compute; each
    backend's float16 kernels differ by about 1e-3, so those rows are keyed by it too.
    """
    key = dict(backbone_key)
    if compute_backend:
        key.update(compute_dtype="mixed_float16", compute_backend=compute_backend)
    if int8:
        key.update(INT8_KEY)
    if flip_average:
        key.update(FLIP_KEY)
    return key


def int8_run_key(key: dict, quantization: dict, calibration: str, model_sha256: str,
                 search: dict | None = None) -> dict:
    """The full key of int8 rows: ``key`` (with :data:`INT8_KEY`) plus the quantisation
    recipe (with the nodes the search kept float), the calibration sample's identity, the
    int8 model's SHA-256 and its measured agreement with fp32 (``search``: the model's
    search record). The cache's file name comes from ``key`` alone, so a cache keeps its
    name when it is recalibrated."""
    search = search or {}
    recipe = dict(quantization)
    if search.get("float_nodes"):
        recipe["float_nodes"] = list(search["float_nodes"])
    full = {**key, "quantization": recipe, "calibration": calibration,
            "int8_model_sha256": model_sha256}
    if search.get("agreement"):  # deterministic, unlike the speed the search also measured
        full["int8_agreement"] = {**search["agreement"], "sample": search.get("sample")}
    return full


def backbone_part(key: dict) -> dict:
    """``key`` without its run fields: what a backbone's own key must equal."""
    return {k: v for k, v in key.items() if k not in RUN_KEY_FIELDS}


def key_hash(key: dict) -> str:
    """Stable 12-hex digest of a key (plus the cache name format)."""
    return json_sha256({**key, "cache_format": NAME_FORMAT})[:12]


def key_variant(key: dict) -> str:
    """How a cache's rows differ from plain fp32 embeddings: "", "int8", "flip-averaged"..."""
    return ", ".join(name for name, on in (("int8", key.get("precision") == "int8"),
                                           ("flip-averaged", key.get("flip_average")),
                                           ("float16 compute", key.get("compute_dtype")))
                     if on)


def cache_path_for(cache_dir, root, backbone: str, weights: str, key: dict) -> Path:
    """Where the cache of dataset ``root`` under backbone ``key`` lives."""
    root = Path(root).resolve()
    # the name cut to 200 characters, so that a folder of a 255-byte name gets a cache too
    dataset = f"{slug(root.name, 'data')[:200]}-{text_sha256(str(root))[:8]}"
    return (Path(cache_dir) / dataset
            / f"{slug(backbone, 'data')}-{slug(weights, 'data')}-{key_hash(key)}.h5")


def shard_dir(cache_path) -> Path:
    """The folder beside a cache index that holds its shard files."""
    cache_path = Path(cache_path)
    return cache_path.with_name(cache_path.name + ".shards")


def parts_dir(cache_path) -> Path:
    """The folder beside a cache index that holds a run's part files until they commit."""
    cache_path = Path(cache_path)
    return cache_path.with_name(cache_path.name + ".parts")
