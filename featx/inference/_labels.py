"""``predict``'s rows: a label, its score and the top-k per file (or why the file could not
be read), and abstaining below a minimum score."""

from __future__ import annotations

import csv
import io

import numpy as np

from featx.errors import UsageError

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


def check_unknown_free(classes, min_score, model_path) -> None:
    """A class named :data:`UNKNOWN` would make an abstention look like that class."""
    if min_score is not None and UNKNOWN in classes:
        raise UsageError(f"{model_path}: a class is named {UNKNOWN!r}, so --min-score could "
                         "not tell an abstention from that class; rename the class folder")


class Predictions(list):
    """What :func:`featx.predict` returns: the list of rows (dicts), one per file, in order,
    with what made them (``model``, ``top_k``, ``min_score``).

    A row has ``path``, ``label``, ``score`` (the label's score), ``top`` (the ``top_k``
    best labels and scores), ``error`` ("" when the file was read), with ``min_score`` a
    ``best_guess``, and for a classifier ``embedded_by`` (where its embedding came from:
    "cache" or the runtime that computed it).
    """

    def __init__(self, model: str, rows, top_k: int, min_score: float | None = None):
        super().__init__(rows)
        self.model, self.top_k, self.min_score = model, top_k, min_score

    @property
    def rows(self) -> list[dict]:
        return list(self)

    @property
    def sources(self) -> list[str]:
        """Where the embeddings came from, once each."""
        return sorted({row.get("embedded_by", "") for row in self} - {""})

    @property
    def failed(self) -> list[tuple[str, str]]:
        return [(row["path"], row["error"]) for row in self if row["error"]]

    def to_dict(self) -> dict:
        return {"model": self.model, "predictions": self.rows}

    def to_csv(self) -> str:
        """path, label, score[, best_guess], then top-k label/score pairs, then error."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        best_guess = self.min_score is not None
        header = ["path", "label", "score"] + (["best_guess"] if best_guess else [])
        for k in range(1, self.top_k + 1):
            header += [f"top{k}_label", f"top{k}_score"]
        writer.writerow(header + ["error"])
        for row in self:
            cells = [row["path"], row["label"],
                     "" if row["score"] is None else f"{row['score']:.6f}"]
            if best_guess:
                cells.append(row.get("best_guess", ""))
            top = row.get("top", [])
            for k in range(self.top_k):
                cells += [top[k]["label"], f"{top[k]['score']:.6f}"] if k < len(top) else ["", ""]
            writer.writerow(cells + [row["error"]])
        return buffer.getvalue()
