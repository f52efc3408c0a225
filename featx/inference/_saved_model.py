"""A saved model of either kind, loaded once after its checks: a classifier from
``featx fit`` (``.skops`` + ``.json`` sidecar) or a network from ``featx finetune``
(``.keras`` + ``.json``, loaded in Keras' safe mode). The one place that asks which kind a
file is."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featx.cache import reconcile
from featx.classifiers import class_scores, load_model
from featx.errors import UsageError
from featx.options import SplitOptions

from ._features import embeddings_for, model_backbone, model_parts
from ._labels import check_unknown_free


class SavedModel:
    """A loaded model and its sidecar metadata.

    ``kind``: "classifier" or "finetune"; ``model``: the fitted scikit-learn pipeline or
    the Keras model; ``class_names``: every class, as the data folder named them;
    ``score_classes``: the class (index into ``class_names``) of each score column.
    """

    def __init__(self, path, kind: str, model, metadata: dict):
        self.path, self.kind, self.model, self.metadata = Path(path), kind, model, metadata
        if kind == "classifier":
            self.class_names = list(metadata["classes"])
            self.score_classes = [int(c) for c in model.classes_]
        else:
            self.class_names = list(metadata["class_names"])
            self.score_classes = list(range(len(self.class_names)))

    @classmethod
    def load(cls, path, *, trust_pickle: bool = False) -> SavedModel:
        """Load ``path``: a ``.keras`` file is a fine-tuned model, anything else a
        classifier (its ``.skops`` or its ``.json`` sidecar). ``trust_pickle``: also load a
        featx 0.1 ``.joblib`` classifier, a pickle that runs code when loaded
        (:func:`featx.classifiers.load_model`)."""
        path = Path(path)
        if path.suffix == ".keras":
            from featx.finetuning import load_finetuned  # imports Keras

            return cls(path, "finetune", *load_finetuned(path))
        return cls(path, "classifier", *load_model(path, trust_pickle=trust_pickle))

    @property
    def classes(self) -> list[str]:
        """The class name of each score column."""
        return [self.class_names[c] for c in self.score_classes]

    @property
    def has_probabilities(self) -> bool:
        return self.kind == "finetune" or hasattr(self.model, "predict_proba")

    @property
    def preprocessing(self) -> dict:
        """How a file becomes the model's input (a combined classifier has one per part)."""
        return self.metadata["preprocessing"]

    def parts(self) -> list[dict]:
        """The feature sources of a classifier (one per backbone of a combination)."""
        return model_parts(self.metadata)

    def backbone(self):
        """The :class:`featx.backbones.Backbone` a classifier's features came from, checked
        against the recorded cache key."""
        return model_backbone(self.metadata)

    def check_min_score(self, min_score) -> None:
        """UsageError where abstaining below ``min_score`` cannot work for this model."""
        if min_score is not None and not self.has_probabilities:
            raise UsageError(f"{self.path}: --min-score needs probabilities, and this "
                             f"{self.metadata.get('clf', 'model')} gives decision values; "
                             "refit it with `featx fit --calibrate`")
        check_unknown_free(self.class_names, min_score, self.path)

    def scores(self, files, runtime: str = "auto", batch_size: int = 32):
        """``predict``'s numbers: (scores, labels, errors, sources). ``scores`` and
        ``labels`` (indices into ``class_names``) have one row per file without an error;
        ``sources`` say where each embedding came from ("" for a fine-tuned model)."""
        if self.kind == "finetune":
            from featx.finetuning import probabilities_and_errors

            probabilities, errors = probabilities_and_errors(self.model, self.metadata, files,
                                                             batch_size)
            scores = probabilities[np.array([not e for e in errors], dtype=bool)]
            return scores, scores.argmax(axis=1), errors, [""] * len(files)
        X, errors, sources = embeddings_for(self.metadata, files, self.model.n_features_in_,
                                            runtime, batch_size)
        ok = np.array([not e for e in errors], dtype=bool)
        if not ok.any():
            return np.zeros((0, len(self.score_classes))), np.zeros(0, int), errors, sources
        return class_scores(self.model, X[ok]), self.model.predict(X[ok]), errors, sources

    def scores_per_file(self, files, runtime: str = "auto", batch_size: int = 32):
        """(scores with one row per file, zeros where it could not be read; errors)."""
        scores, _, errors, _ = self.scores(files, runtime, batch_size)
        full = np.zeros((len(files), len(self.score_classes)), scores.dtype)
        full[[not e for e in errors]] = scores
        return full, errors

    def manifest(self, data_dir):
        """The folder's manifest under the model's split: the split its cache recorded when
        ``data_dir`` is the model's data folder, else its split parameters applied afresh."""
        meta = self.metadata
        root = Path(data_dir)
        split = SplitOptions(**(meta.get("split_params") or {}))
        state = None
        if meta.get("cache") and root.resolve() == Path(meta.get("data_root", "")).resolve():
            state = reconcile.read_state(meta["cache"], meta["cache_key"])
        return reconcile.discover(root, split, state)
