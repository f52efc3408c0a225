"""int8 that says what it costs: the agreement with fp32 on held-back images, the
accuracy-aware search, fp32 where int8 would lose, and the CPU as part of the recipe."""

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, make_dataset
from featx.extraction import (QUANTIZATION, Agreement, cpu_isa, extract, isa_mismatch,
                              measure_agreement, recipe, sample_indices)
from featx.extraction import _int8_agreement, _int8_search


# ----- the agreement -----------------------------------------------------------------------
def _clusters(rng, n_per_class=8, classes=3, dim=16, spread=0.3):
    centres = rng.normal(size=(classes, dim)) * 3
    labels = np.repeat(np.arange(classes), n_per_class)
    return centres[labels] + rng.normal(scale=spread, size=(len(labels), dim)), labels


def test_agreement_of_identical_embeddings_is_perfect():
    x, labels = _clusters(np.random.default_rng(0))
    a = measure_agreement(x, x.copy(), labels)
    assert a.mean_cosine == pytest.approx(1) and a.min_cosine == pytest.approx(1)
    assert a.decisions == 1 and a.n_images == len(x) and a.holds()


def test_agreement_counts_changed_nearest_class_decisions():
    rng = np.random.default_rng(1)
    x, labels = _clusters(rng)
    moved = x.copy()
    moved[0] = x[labels == 1].mean(0)  # image 0 (class 0) now sits on class 1's mean
    a = measure_agreement(x, moved, labels)
    assert a.decisions == pytest.approx(1 - 1 / len(x))
    assert a.min_cosine < 0.9 and not a.holds()
    # noise that moves no decision: the cosine falls, the decisions stay
    noisy = x + rng.normal(scale=0.05, size=x.shape)
    b = measure_agreement(x, noisy, labels)
    assert b.decisions == 1 and 0.99 < b.mean_cosine < 1


def test_nearest_class_leaves_the_image_out_of_its_own_class_mean():
    # image 2 is class 1's only image: without it class 1 has no mean, so it goes to class 0
    # (with itself counted it would stay in class 1); images 0 and 1 each see the other
    x = np.array([[1.0, 0], [0.9, 0.1], [0.1, 1.0]])
    labels = np.array([0, 0, 1])
    assert _int8_agreement._nearest_class(x, x, labels).tolist() == [0, 0, 0]
    # queries other than the reference rows (int8 against fp32): query 0 moved onto class 1
    moved = np.array([[0.1, 1.0], [0.9, 0.1], [0.1, 1.0]])
    assert _int8_agreement._nearest_class(moved, x, labels).tolist() == [1, 0, 0]
    # image 1 without itself: class 1's mean is image 2's, farther than class 0's
    labels = np.array([0, 1, 1])
    assert _int8_agreement._nearest_class(x, x, labels).tolist() == [1, 0, 1]


def test_the_bound():
    bound = _int8_agreement.MIN_MEAN_COSINE
    assert Agreement(bound, 0.5, 1.0, 64).holds()
    assert not Agreement(bound - 1e-3, 0.5, 1.0, 64).holds()
    assert Agreement(0.999, 0.99, 63 / 64, 64).holds()  # one changed decision in 64
    assert not Agreement(0.999, 0.99, 62 / 64, 64).holds()


# ----- the samples -------------------------------------------------------------------------
class _Manifest:
    def __init__(self, splits):
        self.splits = np.asarray(splits)
        self.paths = [f"{i}.png" for i in range(len(splits))]


def test_calibration_and_held_back_samples_are_disjoint_and_seeded():
    manifest = _Manifest(["train"] * 300 + ["val"] * 50)
    calibration, held = sample_indices(manifest, 42, 64)
    assert len(calibration) == len(held) == 64 and not set(calibration) & set(held)
    assert max(calibration.max(), held.max()) < 300  # training images only
    assert all((a == b).all() for a, b in zip((calibration, held),
                                              sample_indices(manifest, 42, 64)))
    small = _Manifest(["train"] * 9)
    calibration, held = sample_indices(small, 0, 64)  # shared half and half
    assert (len(calibration), len(held)) == (5, 4) and not set(calibration) & set(held)


# ----- the CPU is part of the recipe ---------------------------------------------------------
def test_the_recipe_names_the_instruction_set_and_the_calibration():
    assert cpu_isa("flags : avx2 avx512_vnni", "x86_64") == "x86-vnni"
    assert cpu_isa("flags : avx2 fma", "x86_64") == "x86-novnni"
    assert cpu_isa("", "aarch64") == "aarch64"
    assert recipe("entropy")["calibration"] == "Entropy"
    assert recipe()["isa"] == QUANTIZATION["isa"] == cpu_isa()
    assert QUANTIZATION.get("reduce_range", False) == (cpu_isa() == "x86-novnni")
    other = "x86-vnni" if cpu_isa() != "x86-vnni" else "x86-novnni"
    assert "this CPU is" in isa_mismatch({**recipe(), "isa": other})
    assert isa_mismatch(recipe()) is None
    # a recipe from before featx recorded the instruction set: judged by its 7-bit weights
    old = {k: v for k, v in recipe().items() if k != "isa"}
    assert (isa_mismatch(old) is None) == (cpu_isa() in ("x86-vnni", "x86-novnni"))


# ----- on the tiny network (test_runtimes.py has the rest end to end) ------------------------

@pytest.mark.tensorflow_only
def test_int8_that_cannot_keep_the_bound_is_not_used(tmp_path, monkeypatch, caplog):
    """A bound no int8 model can keep: the search tries its candidates, then featx says so
    in one line and extracts in fp32 (the same rows as a plain fp32 run)."""
    monkeypatch.setattr(_int8_agreement, "MIN_MEAN_COSINE", 1.01)
    monkeypatch.setitem(_int8_search.SEARCH, "min_mean_cosine", 1.01)  # a new stored model
    monkeypatch.setattr(_int8_search, "CANDIDATES", 1)
    monkeypatch.setattr(_int8_search, "MIN_SPEEDUP", 0.0)  # the search runs even where slower
    data = make_dataset(tmp_path / "data", per_class=5)
    kw = dict(cache_dir=tmp_path / "cache", progress=False, **TINY)
    with caplog.at_level(logging.WARNING):
        declined = extract(data, precision="int8", **kw)
    lines = [r.getMessage() for r in caplog.records if "int8 not used" in r.getMessage()]
    assert len(lines) == 1 and "extracting in fp32" in lines[0] and "\n" not in lines[0]
    assert declined.precision == "fp32" and "int8_agreement" not in declined.key
    # the search measured the plain model and one with its most error-prone segment float
    records = [json.loads(path.read_text()) for path in
               Path(os.environ["FEATX_ONNX_STORE"]).glob("*-int8-*.json")]
    (record,) = [r["search"] for r in records if r["key"]["search"]["min_mean_cosine"] > 1]
    assert record["use"] == "fp32" and len(record["tried"]) == 2
    assert record["tried"][1]["float_nodes"] >= 1
    fp32 = extract(data, **kw)
    assert fp32.cache_path == declined.cache_path and fp32.stats.n_extracted == 0


def test_features_of_an_int8_model_from_before_recipes_named_the_cpu_are_refused(tmp_path):
    """A classifier fitted on int8 features of a featx that did not record the instruction
    set: one line naming its cache, not a KeyError."""
    from featx.errors import DataError
    from featx.inference import model_int8

    old = {k: v for k, v in recipe("minmax").items() if k != "isa"}
    metadata = {"cache": str(tmp_path / "c.h5"),
                "cache_key": {"precision": "int8", "quantization": old, "calibration": "x",
                              "int8_model_sha256": "0" * 64}}
    with pytest.raises(DataError, match="c.h5: .*(did not record|this CPU is)"):
        model_int8(metadata, None)
