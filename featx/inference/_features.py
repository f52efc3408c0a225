"""A saved classifier's features for new image files, exactly as it was trained on: the
cached row where a file's content is cached (train/predict parity), else the backbone,
preprocessing and runtime its metadata records, rebuilt and checked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from featx._io import file_sha256
from featx.backbones import create_backbone
from featx.cache import backbone_part
from featx.cache.reconcile import cached_embeddings
from featx.errors import DataError
from featx.extraction import (FlipAveraging, KerasMapper, describe, isa_mismatch, map_files,
                              open_mapper, plan_device, store_for, stored_int8)


def model_backbone(metadata: dict):
    """The backbone a saved classifier's features came from; refuses a different one."""
    opts = metadata["backbone_options"]
    weights = metadata["weights"] if metadata["weights"] != "file" else opts["weights_arg"]
    backbone = create_backbone(metadata["backbone"], weights, layer=opts.get("layer") or None,
                               pooling=opts.get("pooling"), input_size=opts.get("input_size"),
                               seed=opts.get("seed", 0),
                               reduced_decode=bool(metadata["cache_key"].get("preprocessing", {})
                                                   .get("reduced_decode")))
    if backbone.weights_id != metadata["weights_id"]:
        raise DataError(f"the model was trained on {metadata['weights_id']} features but "
                        f"{backbone.weights_id} is what is available here")
    recorded = backbone_part(metadata["cache_key"])
    if json.loads(json.dumps(backbone.key())) != recorded:
        raise DataError("the model's cache key does not match this featx's backbone "
                        f"({metadata['backbone']}): its features cannot be reproduced here")
    return backbone


def model_store(metadata: dict) -> Path:
    """The ONNX export store of the cache a saved classifier's features came from."""
    return store_for(Path(metadata["cache"]).parent.parent)  # <cache_dir>/<dataset>/<file>


def model_int8(metadata: dict, backbone):
    """The int8 feature model a classifier fitted on int8 features was computed with;
    DataError when the store no longer holds it unchanged."""
    key, store = metadata["cache_key"], model_store(metadata)
    cache = metadata.get("cache", "the model's cache")
    other_cpu = isa_mismatch(key.get("quantization"))
    if other_cpu:
        raise DataError(f"{cache}: the model was fitted on the features of {other_cpu}: fit "
                        "it again here (featx fit DATA --precision int8) or on fp32 features")
    recipe = {k: v for k, v in key.get("quantization", {}).items() if k != "float_nodes"}
    if "isa" not in recipe:
        raise DataError(f"{cache}: the model was fitted on int8 features of a featx that did "
                        "not record its int8 recipe: fit it again (featx fit DATA --precision "
                        "int8)")
    found = stored_int8(backbone, store, key.get("calibration", ""), key.get("int8_model_sha256"),
                        recipe)
    if found is None:
        sha = str(key.get("int8_model_sha256"))[:12]
        raise DataError(f"the model's int8 feature model ({sha}) is not in {store}; run "
                        "`featx extract --precision int8` on its data again")
    return found


def model_mapper(metadata: dict, backbone, runtime: str, batch_size: int):
    """The runtime that reproduces the model's training features (int8 only by its model;
    flip-averaged when they were)."""
    precision = metadata["cache_key"].get("precision", "fp32")
    _, device = plan_device(runtime, precision)
    int8_model = model_int8(metadata, backbone) if precision == "int8" else None
    mapper = open_mapper(backbone, runtime, precision, device, model_store(metadata), batch_size,
                         int8_model)
    return FlipAveraging(mapper) if metadata["cache_key"].get("flip_average") else mapper


def embed_files(backbone, files, batch_size=32, *, mapper=None):
    """Embeddings of image files (not cached). Returns (X, errors) with '' for success."""
    return map_files([Path(f).resolve() for f in files], backbone.preprocessing,
                     mapper or KerasMapper(backbone, batch_size), backbone.dim,
                     batch_size=batch_size)


def model_parts(metadata: dict) -> list[dict]:
    """The feature sources of a saved classifier: one per part of a combined backbone, else
    the metadata itself (each has backbone, weights, cache_key, cache, preprocessing...)."""
    return list(metadata.get("parts") or [metadata])


def embeddings_for(metadata: dict, files, dim: int, runtime: str, batch_size: int):
    """(X, errors, source per file) for a saved model: each part's embeddings side by side
    (:func:`part_embeddings`); a file that fails in one part is not embedded by the next."""
    parts = model_parts(metadata)
    hashes = [content_hash(f) for f in files]
    blocks, errors, sources = [], [""] * len(files), [[] for _ in files]
    for part in parts:
        block = np.zeros((len(files), part.get("dim", dim)), np.float32)
        alive = [i for i, error in enumerate(errors) if not error]
        X, part_errors, part_sources = part_embeddings(
            part, [files[i] for i in alive], [hashes[i] for i in alive], block.shape[1],
            runtime, batch_size)
        block[alive] = X
        blocks.append(block)
        for i, error, source in zip(alive, part_errors, part_sources):
            errors[i] = error
            sources[i].append(source)
    sources = [" + ".join(dict.fromkeys(s)) for s in sources]
    return np.concatenate(blocks, axis=1), errors, sources


def part_embeddings(source: dict, files, hashes, dim: int, runtime: str, batch_size: int):
    """(X, errors, source per file) for one backbone of a saved model: the row of its cache
    where a file's content is cached (train/predict parity), else embedded as
    :func:`model_mapper` does."""
    cached = cached_embeddings(source.get("cache", ""), source.get("cache_key"), hashes)
    todo = [i for i, h in enumerate(hashes) if h not in cached]
    X = np.zeros((len(files), dim), np.float32)
    errors, sources = [""] * len(files), ["cache"] * len(files)
    if todo:
        backbone = model_backbone(source)
        mapper = model_mapper(source, backbone, runtime, batch_size)
        X[todo], new_errors = embed_files(backbone, [files[i] for i in todo], batch_size,
                                          mapper=mapper)
        embedded_by = describe(mapper)
        for i, error in zip(todo, new_errors):
            errors[i], sources[i] = error, embedded_by
    for i, h in enumerate(hashes):
        if h in cached:
            X[i] = cached[h]
    return X, errors, sources


def content_hash(path) -> str:
    """The file's SHA-256, or "" when it cannot be read (embedding it then reports why)."""
    try:
        return file_sha256(path)
    except OSError:
        return ""
