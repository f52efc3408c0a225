"""How far an int8 model's embeddings are from the float model's, measured on a held-back
sample of the dataset's own training images, and the bound an int8 model must keep."""

from __future__ import annotations

import dataclasses

import numpy as np

# An int8 model is used only where, on the held-back sample, its embeddings keep a mean
# cosine of at least MIN_MEAN_COSINE to the float model's and change at most
# MAX_CHANGED_DECISIONS of the sample's nearest-class decisions (1 of 64). Chosen from
# benchmarks/int8.py (docs/benchmarks.md) on Lite0, dogcat and three sets made from its photos,
# on an AVX2 CPU without VNNI: the changed decisions told the int8 models that lost probe
# accuracy (3-26 of 64 changed, 0.7-7.2 points lost) from those that did not (at most 2
# changed); the mean cosine did not (0.80-0.98 among the latter). The cosine bound catches
# gross failures: Entropy's clipped ranges (0.80-0.85), or a model quantised for VNNI run
# without it (0.91).
MIN_MEAN_COSINE = 0.95
MAX_CHANGED_DECISIONS = 0.03


@dataclasses.dataclass(frozen=True)
class Agreement:
    """int8 against fp32 on ``n_images`` held-back images: the cosine of each image's two
    embeddings (mean, minimum) and the share of nearest-class decisions that agree."""

    mean_cosine: float
    min_cosine: float
    decisions: float
    n_images: int

    def holds(self) -> bool:
        return (self.mean_cosine >= MIN_MEAN_COSINE
                and self.decisions >= 1 - MAX_CHANGED_DECISIONS - 1e-9)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def agreement_text(agreement: dict) -> str:
    """A recorded agreement (:meth:`Agreement.to_dict`, with its ``sample``) in words."""
    return (f"vs fp32 on {agreement['n_images']} {agreement.get('sample') or 'held-back'} "
            f"training images: cosine mean {agreement['mean_cosine']:.4f} (min "
            f"{agreement['min_cosine']:.4f}), {agreement['decisions']:.1%} of nearest-class "
            "decisions agree")


def measure_agreement(fp32: np.ndarray, int8: np.ndarray, labels) -> Agreement:
    """The agreement of ``int8`` embeddings with ``fp32`` ones of the same images.

    A nearest-class decision assigns an image to the class whose mean fp32 embedding
    (L2-normalised, without the image itself) is closest in cosine; it agrees when the
    image's int8 embedding gets the same class as its fp32 one.
    """
    a, b = _unit(fp32), _unit(int8)
    cosine = (a * b).sum(1)
    labels = np.asarray(labels)
    return Agreement(float(cosine.mean()), float(cosine.min()),
                     float(np.mean(_nearest_class(a, a, labels)
                                   == _nearest_class(b, a, labels))), int(len(a)))


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _nearest_class(queries, reference, labels):
    """Each query's nearest class mean of ``reference`` by cosine (leave-one-out: query i is
    reference row i, left out of its own class's mean), from (queries x classes) products
    only: the mean without row i is the class sum minus row i."""
    classes, index = np.unique(labels, return_inverse=True)
    sums = np.zeros((len(classes), reference.shape[1]))
    np.add.at(sums, index, reference)
    counts = np.bincount(index, minlength=len(classes))
    own = np.zeros((len(queries), len(classes)))
    own[np.arange(len(queries)), index] = 1.0
    dots = queries @ sums.T - own * (queries * reference).sum(1, keepdims=True)
    # |sum - own * row|^2 = |sum|^2 - 2 own sum.row + own |row|^2
    norms = ((sums ** 2).sum(1)[None] - 2 * own * (reference @ sums.T)
             + own * (reference ** 2).sum(1, keepdims=True))
    scores = dots / np.sqrt(np.maximum(norms, 1e-24))
    scores[(counts[None] - own) < 1] = -np.inf  # a class of one image has no mean without it
    return classes[scores.argmax(1)]
