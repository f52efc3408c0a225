"""Accuracy-aware int8: quantise, measure the agreement with fp32 on held-back images, and
keep the most error-prone nodes in float until the bound holds, or until int8 would be no
faster than fp32 (then fp32 is used, and the record says so)."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np

from ._int8_agreement import MAX_CHANGED_DECISIONS, MIN_MEAN_COSINE, measure_agreement
from ._quantize import Quantizer

log = logging.getLogger(__name__)

# The search tries the segments (a measured node and the unmeasured nodes that feed it,
# such as the Conv under a fused Relu6) of the CANDIDATES largest per-node errors, most
# harmful first, and keeps each that raises the mean cosine without losing a decision.
# Measured on Lite0 (dogcat, AVX2 without VNNI): keeping nodes float is not monotonic (one
# conv kept float lowered the mean cosine from 0.978 to 0.919), hence one measurement per
# candidate.
CANDIDATES = 12
NODE_ERROR_IMAGES = 8  # images the per-node errors are measured on (memory: every tensor)
MIN_SPEEDUP = 1.0  # nodes kept float must leave int8 faster than fp32 (held-back images)
# What decides the search's outcome besides the recipe: a change rebuilds stored models
SEARCH = {"min_mean_cosine": MIN_MEAN_COSINE, "max_changed_decisions": MAX_CHANGED_DECISIONS,
          "candidates": CANDIDATES, "min_speedup": MIN_SPEEDUP, "version": 1}


def search_int8(fp32_model, calibration: np.ndarray, held: np.ndarray, labels, quantization,
                out: Path, work: Path, mapper_for) -> dict:
    """Write the accuracy-aware int8 model to ``out``; return its record.

    ``mapper_for(path)`` runs an ONNX file (featx's :class:`OnnxMapper`); ``held``/``labels``:
    the held-back images the agreement is measured on. The record: ``agreement`` (a dict),
    ``float_nodes`` (the nodes kept float), ``speedup`` (int8 / fp32 images per second on
    ``held``; None where the plain model kept the bound, as nothing was to decide),
    ``tried`` (one entry per model measured) and ``use`` ("int8", or "fp32" when the bound
    could not be kept, or only with nodes kept float at no gain in speed).
    """
    quantizer = Quantizer(fp32_model.path, calibration, work, quantization)
    fp32_mapper = mapper_for(fp32_model.path)
    reference = _embed(fp32_mapper, held)

    def trial(excluded, name):
        path = work / f"{name}.onnx"
        quantizer.quantize(path, excluded)
        mapper = mapper_for(path)
        agreement = measure_agreement(reference, _embed(mapper, held), labels)
        return path, mapper, agreement

    path, mapper, agreement = trial([], "plain")
    best = {"path": path, "agreement": agreement, "float_nodes": [], "speedup": None}
    if not agreement.holds():  # timed only where it decides something
        best["speedup"] = speedup(fp32_mapper, mapper, held)
    tried = [_entry(best)]
    if not agreement.holds() and best["speedup"] > MIN_SPEEDUP:
        for i, segment in enumerate(error_prone(quantizer, path, held)):
            excluded = list(dict.fromkeys(best["float_nodes"] + segment))  # segments share
            if len(excluded) == len(best["float_nodes"]):
                continue
            path, mapper, agreement = trial(excluded, f"try{i}")
            entry = {"float_nodes": len(excluded), "agreement": agreement.to_dict()}
            tried.append(entry)
            if not _better(agreement, best["agreement"]):
                continue
            best = {"path": path, "agreement": agreement, "float_nodes": excluded,
                    "speedup": speedup(fp32_mapper, mapper, held)}
            entry["speedup"] = best["speedup"]
            if agreement.holds() or best["speedup"] <= MIN_SPEEDUP:
                break
    shutil.copyfile(best["path"], out)
    # the plain model's speed is reported, not judged: int8 was asked for, and it is
    # accurate; float nodes are worth keeping only while int8 stays the faster
    holds = best["agreement"].holds() and (not best["float_nodes"]
                                           or best["speedup"] > MIN_SPEEDUP)
    return {"agreement": best["agreement"].to_dict(), "float_nodes": best["float_nodes"],
            "speedup": _rounded(best["speedup"]), "tried": tried,
            "use": "int8" if holds else "fp32"}


def _better(agreement, than) -> bool:
    """Whether keeping a segment float paid: a higher mean cosine, no decision lost (on
    a 16-class set, higher cosines with fewer kept decisions lost probe accuracy)."""
    return agreement.mean_cosine > than.mean_cosine and agreement.decisions >= than.decisions


def error_prone(quantizer: Quantizer, quantized: Path, images: np.ndarray) -> list[list[str]]:
    """The :data:`CANDIDATES` segments with the largest measured error, largest first."""
    started = time.perf_counter()
    drops, segments = quantizer.node_errors(quantized, images[:NODE_ERROR_IMAGES])
    ranked = sorted(drops, key=drops.get, reverse=True)[:CANDIDATES]
    log.info("measured %d nodes' int8 error in %.1f s", len(drops), time.perf_counter() - started)
    return [segments[name] for name in ranked]


def speedup(fp32_mapper, int8_mapper, images, passes: int = 3) -> float:
    """int8 / fp32 images per second on ``images``: best of ``passes`` alternating passes
    (the best, as the least disturbed by other work on a shared machine)."""
    rates = {"fp32": [], "int8": []}
    for _ in range(passes):
        for name, mapper in (("fp32", fp32_mapper), ("int8", int8_mapper)):
            started = time.perf_counter()
            _embed(mapper, images)
            rates[name].append(len(images) / max(time.perf_counter() - started, 1e-9))
    return max(rates["int8"]) / max(rates["fp32"])


def _embed(mapper, images, batch: int = 32) -> np.ndarray:
    return np.concatenate([mapper(images[i:i + batch]) for i in range(0, len(images), batch)])


def _entry(best) -> dict:
    return {"float_nodes": len(best["float_nodes"]), "agreement": best["agreement"].to_dict(),
            "speedup": _rounded(best["speedup"])}


def _rounded(value):
    return None if value is None else round(value, 3)
