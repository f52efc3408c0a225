"""Embedding and labelling new image files for a saved model, exactly as it was trained.

A model saved by ``featx fit`` records its backbone, preprocessing, cache key and runtime
precision; :func:`model_backbone` and :func:`model_mapper` rebuild exactly that, refusing
what would give other features. :func:`label_rows` turns scores into ``predict``'s rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from featx.errors import DataError


def model_backbone(metadata: dict):
    """The backbone a saved classifier's features came from; refuses a different one."""
    from featx.backbones import create_backbone
    from featx.extraction import RUN_KEY_FIELDS

    opts = metadata["backbone_options"]
    weights = metadata["weights"] if metadata["weights"] != "file" else opts["weights_arg"]
    net = create_backbone(metadata["backbone"], weights, layer=opts.get("layer") or None,
                          pooling=opts.get("pooling"), input_size=opts.get("input_size"),
                          seed=opts.get("seed", 0),
                          reduced_decode=bool(metadata["cache_key"].get("preprocessing", {})
                                              .get("reduced_decode")))
    if net.weights_id != metadata["weights_id"]:
        raise DataError(f"the model was trained on {metadata['weights_id']} features but "
                        f"{net.weights_id} is what is available here")
    recorded = {k: v for k, v in metadata["cache_key"].items() if k not in RUN_KEY_FIELDS}
    if json.loads(json.dumps(net.key())) != recorded:
        raise DataError("the model's cache key does not match this featx's backbone "
                        f"({metadata['backbone']}): its features cannot be reproduced here")
    return net


def model_store(metadata: dict) -> Path:
    """The ONNX export store of the cache a saved classifier's features came from."""
    from featx.onnx_export import store_for

    return store_for(Path(metadata["cache"]).parent.parent)  # <cache_dir>/<dataset>/<file>


def model_int8(metadata: dict, net):
    """The int8 feature model a classifier fitted on int8 features was computed with;
    DataError when the store no longer holds it unchanged."""
    from featx.onnx_export import stored_int8

    key, store = metadata["cache_key"], model_store(metadata)
    found = stored_int8(net, store, key.get("calibration", ""), key.get("int8_model_sha256"))
    if found is None:
        sha = str(key.get("int8_model_sha256"))[:12]
        raise DataError(f"the model's int8 feature model ({sha}) is not in {store}; run "
                        "`featx extract --precision int8` on its data again")
    return found


def model_mapper(metadata: dict, net, runtime: str, batch_size: int):
    """The runtime that reproduces the model's training features (int8 only by its model;
    flip-averaged when they were)."""
    from featx.pipeline import FlipAveraging
    from featx.runtimes import open_mapper, plan_device

    precision = metadata["cache_key"].get("precision", "fp32")
    _, device = plan_device(runtime, precision)
    int8_model = model_int8(metadata, net) if precision == "int8" else None
    mapper = open_mapper(net, runtime, precision, device, model_store(metadata), batch_size,
                         int8_model)
    return FlipAveraging(mapper) if metadata["cache_key"].get("flip_average") else mapper


def embed_files(net, files, batch_size=32, *, mapper=None):
    """Embeddings of image files (not cached). Returns (X, errors) with '' for success."""
    from featx.pipeline import ArrayWriter, ImageReader, run_pipeline
    from featx.runtimes import KerasMapper

    reader = ImageReader([Path(f).resolve() for f in files], net.preprocessing, batch_size)
    writer = ArrayWriter(len(files), net.dim)
    run_pipeline(reader, mapper or KerasMapper(net, batch_size), writer, progress=False)
    return writer.embeddings, writer.errors


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
    from featx.reconcile import cached_embeddings
    from featx.runtimes import describe

    cached = cached_embeddings(source.get("cache", ""), source.get("cache_key"), hashes)
    todo = [i for i, h in enumerate(hashes) if h not in cached]
    X = np.zeros((len(files), dim), np.float32)
    errors, sources = [""] * len(files), ["cache"] * len(files)
    if todo:
        net = model_backbone(source)
        mapper = model_mapper(source, net, runtime, batch_size)
        X[todo], new_errors = embed_files(net, [files[i] for i in todo], batch_size,
                                          mapper=mapper)
        embedded_by = describe(mapper)
        for i, error in zip(todo, new_errors):
            errors[i], sources[i] = error, embedded_by
    for i, h in enumerate(hashes):
        if h in cached:
            X[i] = cached[h]
    return X, errors, sources


def classifier_scores(estimator, metadata: dict, files, runtime: str, batch_size: int):
    """``predict``'s numbers for a fitted classifier: (scores, labels, errors, sources).

    ``scores`` and ``labels`` have one row per file without an error (scores' columns
    follow ``estimator.classes_``); ``sources`` say where each embedding came from.
    """
    from featx.classifiers import class_scores

    X, errors, sources = embeddings_for(metadata, files, estimator.n_features_in_, runtime,
                                        batch_size)
    ok = np.array([not e for e in errors], dtype=bool)
    if not ok.any():
        return np.zeros((0, len(estimator.classes_))), np.zeros(0, int), errors, sources
    return class_scores(estimator, X[ok]), estimator.predict(X[ok]), errors, sources


def content_hash(path) -> str:
    """The file's SHA-256, or "" when it cannot be read (embedding it then reports why)."""
    from featx.data import file_sha256

    try:
        return file_sha256(path)
    except OSError:
        return ""


UNKNOWN = "unknown"


def label_rows(files, errors, scores, labels, score_classes, classes, top_k, *,
               min_score=None) -> list[dict]:
    """``predict``'s rows: a label, its score and the top-k per file, or the file's error.

    ``scores`` (one row per file without an error) has a column per entry of
    ``score_classes`` (class indices into ``classes``); ``labels`` are predicted indices.
    With ``min_score``, every row gets ``best_guess`` (the top class) and a row whose score
    is below ``min_score`` is labelled :data:`UNKNOWN`.
    """
    score_classes = [int(c) for c in score_classes]
    rows, k = [], 0
    for path, error in zip(files, errors):
        if error:
            row = {"path": str(path), "label": "", "score": None, "error": error}
            rows.append(row if min_score is None else {**row, "best_guess": ""})
            continue
        order = np.argsort(-scores[k])[:top_k]
        label = int(labels[k])
        row = {"path": str(path), "label": classes[label],
               "score": float(scores[k][score_classes.index(label)]),
               "top": [{"label": classes[score_classes[j]], "score": float(scores[k][j])}
                       for j in order],
               "error": ""}
        if min_score is not None:
            row["best_guess"] = row["label"]
            if row["score"] < min_score:
                row["label"] = UNKNOWN
        rows.append(row)
        k += 1
    return rows
