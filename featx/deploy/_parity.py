"""Parity of an export with ``featx predict``: the exported file run alone (onnxruntime, or
Keras) on a folder's validation images, its labels and scores compared with predict's."""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

import numpy as np

from featx.backbones import load_keras_model
from featx.errors import DataError
from featx.extraction import isa_mismatch, map_files
from featx.inference import SavedModel

from ._write import KERAS_MEMBER, METADATA_KEY

FP32_SCORE_TOLERANCE = 1e-4
# Parity bounds against `featx predict`. An export of the precision the model was fitted
# on runs the same computation (the int8 export of a model fitted on int8 features reuses
# its very int8 feature model), so it must match like fp32. An export of another precision
# is bounded by what was measured on photos (benchmarks/export.py, README "Export"): the
# same label for this share of images at least, and scores no further apart on average
# than this, per output kind (single borderline images move much more, so the maximum is
# printed, not bounded).
INT8_MIN_AGREEMENT = 0.97
INT8_MAX_MEAN_SCORE_DIFF = {"probabilities": 0.03, "decision_values": 0.3}


def read_export_metadata(path) -> dict:
    """The metadata an exported ``.onnx`` or ``.keras`` file carries."""
    path = Path(path)
    try:
        if path.suffix == ".onnx":
            import onnx

            props = {p.key: p.value for p in
                     onnx.load(str(path), load_external_data=False).metadata_props}
            return json.loads(props[METADATA_KEY])
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read(KERAS_MEMBER))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a featx export ({type(exc).__name__}: {exc})") from None


class ExportedRunner:
    """Runs an exported file with its own runtime alone: ``runner(images) -> scores``."""

    def __init__(self, path):
        self.path = Path(path)
        self.metadata = read_export_metadata(self.path)
        other_cpu = (isa_mismatch(self.metadata.get("quantization"))
                     if self.metadata.get("precision") == "int8" else None)
        if other_cpu:
            raise DataError(f"{self.path}: {other_cpu}: export it again on this kind of CPU")
        if self.path.suffix == ".onnx":
            import onnxruntime as ort

            self._session = ort.InferenceSession(str(self.path),
                                                 providers=["CPUExecutionProvider"])
            self._input = self._session.get_inputs()[0].name
        else:
            # featx's own layers left unregistered: the export must load without featx
            self._model = load_keras_model(self.path, featx_layers=False, compile=False)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if self.path.suffix == ".onnx":
            return self._session.run(None, {self._input: images})[0]
        return np.asarray(self._model.predict_on_batch(images))  # compiled once, then reused


@dataclasses.dataclass
class Parity:
    n_images: int
    split: str
    agreement: float
    n_disagree: int
    max_score_diff: float
    mean_score_diff: float
    precision: str
    fitted_on: str  # the precision of the features the model was fitted on
    bound: dict
    passed: bool
    disagreements: list
    n_unreadable: int = 0  # files featx could not decode: checked by neither side

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def line(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        bound = [f"agreement >= {self.bound['min_agreement']:.0%}"]
        if "max_score_diff" in self.bound:
            bound.append(f"max difference <= {self.bound['max_score_diff']:g}")
        if "max_mean_score_diff" in self.bound:
            bound.append(f"mean difference <= {self.bound['max_mean_score_diff']:g}")
        what = (self.precision if self.precision == self.fitted_on
                else f"{self.precision} export of a model fitted on {self.fitted_on} features")
        skipped = f", {self.n_unreadable} unreadable skipped" if self.n_unreadable else ""
        return (f"parity {verdict} on {self.n_images} {self.split} images ({what}{skipped}): "
                f"same label for {self.agreement:.2%} ({self.n_disagree} differ), score "
                f"difference max {self.max_score_diff:.2e} mean {self.mean_score_diff:.2e} "
                f"(bound: {', '.join(bound)})")


def parity_bound(precision: str, fitted_on: str, output: str) -> dict:
    """What an export of ``precision``, of a model fitted on ``fitted_on`` features, must
    meet against ``featx predict``."""
    if precision == fitted_on:
        return {"min_agreement": 1.0, "max_score_diff": FP32_SCORE_TOLERANCE}
    return {"min_agreement": INT8_MIN_AGREEMENT,
            "max_mean_score_diff": INT8_MAX_MEAN_SCORE_DIFF[output]}


def check_export(exported_path, model_path, data_dir, *, batch_size: int = 32,
                 runtime: str = "auto", trust_pickle: bool = False) -> Parity:
    """Run the exported file alone on ``data_dir``'s validation images (the model's
    recorded split; test, else every image, when there is no val split) and compare with
    ``featx predict``'s scores and labels for the same files. ``trust_pickle``: as for
    :meth:`featx.inference.SavedModel.load`."""
    runner = ExportedRunner(exported_path)
    model = SavedModel.load(model_path, trust_pickle=trust_pickle)
    if runner.metadata.get("source_model", {}).get("sha256") != model.metadata.get("sha256"):
        raise DataError(f"{exported_path} was not exported from {model_path} (its recorded "
                        "source model has another SHA-256)")
    split, files = _check_files(model.manifest(data_dir))
    ref, ref_errors = model.scores_per_file(files, runtime, batch_size)
    got, got_errors = map_files(files, runner.metadata["preprocessing"], runner,
                                len(runner.metadata["classes"]), batch_size=batch_size,
                                desc="check")
    ok = np.array([not a and not b for a, b in zip(ref_errors, got_errors)], dtype=bool)
    if not ok.any():
        raise DataError(f"{data_dir}: no image could be read to check the export on")
    parity = _compare(ref[ok], got[ok], [f for f, k in zip(files, ok) if k], split,
                      runner.metadata)
    parity.n_unreadable = int((~ok).sum())
    return parity


def _compare(ref, got, files, split, metadata) -> Parity:
    """Labels and scores of the export (``got``) against predict's (``ref``), same rows."""
    same = ref.argmax(axis=1) == got.argmax(axis=1)
    diff = np.abs(ref - got)
    precision = metadata.get("precision", "fp32")
    fitted_on = metadata.get("fitted_on", "fp32")
    bound = parity_bound(precision, fitted_on, metadata["output"])
    agreement = float(same.mean())
    passed = (agreement >= bound["min_agreement"]
              and float(diff.max()) <= bound.get("max_score_diff", np.inf)
              and float(diff.mean()) <= bound.get("max_mean_score_diff", np.inf))
    classes = metadata["classes"]
    disagreements = [{"path": str(files[i]), "predict": classes[int(ref[i].argmax())],
                      "export": classes[int(got[i].argmax())]}
                     for i in np.flatnonzero(~same)[:20]]
    return Parity(len(files), split, agreement, int((~same).sum()), float(diff.max()),
                  float(diff.mean()), precision, fitted_on, bound, passed, disagreements)


def _check_files(manifest):
    """(split, files): the manifest's images of the first non-empty of val and test, else
    ("all", every image)."""
    splits = np.asarray(manifest.splits)
    for split in ("val", "test"):
        if (splits == split).any():
            return split, [manifest.root / p for p, s in zip(manifest.paths, splits)
                           if s == split]
    return "all", [manifest.root / p for p in manifest.paths]
