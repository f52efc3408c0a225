"""What `featx audit` writes: audit.md, audit.json, a contact sheet per finding type and
the embedding map, from the findings of :mod:`._findings`."""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np

from featx._io import to_json
from featx.data import read_image
from featx.errors import ImageDecodeError
from featx.options import THRESHOLD_EVIDENCE

SHEETS = {"duplicates": "duplicates.png", "label_errors": "label_errors.png",
          "outliers": "outliers.png"}


MAP_FILE = "map.png"


THUMB = 160  # thumbnail side in pixels


COLUMNS = 6


# ----- the report ---------------------------------------------------------------------
def write_audit_report(audit, findings, dataset: dict, report_dir, *, labels) -> dict:
    """Write audit.json, audit.md, the contact sheets and the map into ``report_dir``;
    audit.json holds every finding; audit.md and the contact sheets show the first
    ``audit.options.top`` of each list and say how many more there are.

    ``dataset``: ``root``, ``n_images``, ``class_names``, ``backbone``, ``weights_id``,
    ``provenance``, ``n_excluded``. ``labels``: class index per row (for the map).
    Returns the written files by name.
    """
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*SHEETS.values(), MAP_FILE]:  # pictures of an earlier audit
        (report_dir / stale).unlink(missing_ok=True)
    top = audit.options.top
    root = Path(dataset["root"])
    files = {}
    for name, file in SHEETS.items():
        cells = _sheet_cells(name, findings[name][:top])
        if cells:
            files[name] = str(contact_sheet(cells, root, report_dir / file,
                                            _sheet_title(name, dataset)))
    if audit.coords is not None:
        files["map"] = str(embedding_map_png(audit, labels, dataset["class_names"],
                                             report_dir / MAP_FILE, top))
    summary = audit_json(audit, findings, dataset, files)
    files["json"] = str(report_dir / "audit.json")
    files["markdown"] = str(report_dir / "audit.md")
    summary["files"] = files
    Path(files["json"]).write_text(to_json(summary, indent=2))
    Path(files["markdown"]).write_text(audit_markdown(summary))
    return files


def audit_json(audit, findings, dataset, files) -> dict:
    options = audit.options
    return {
        "dataset": dataset,
        "options": {"threshold": options.threshold, "verify": options.verify,
                    "candidate_cosine": options.candidate_cosine,
                    "candidates": options.candidates, "min_inliers": options.min_inliers,
                    "folds": options.folds,
                    "neighbours": options.neighbours, "outlier_z": options.outlier_z,
                    "top": options.top, "map": audit.map_method, "seed": options.seed},
        "threshold": {"cosine": options.threshold, "evidence": THRESHOLD_EVIDENCE,
                      "nearest_similarity": audit.nearest},
        "counts": audit.counts,
        **findings,
        "skipped": audit.skipped,
        "seconds": {k: round(v, 3) for k, v in audit.seconds.items()},
        "files": files,
    }


def audit_markdown(summary) -> str:
    data, counts, opts = summary["dataset"], summary["counts"], summary["options"]
    nearest = summary["threshold"]["nearest_similarity"]
    lines = [
        "# Data audit", "",
        f"Data: `{data['root']}`: {data['n_images']} images, {len(data['class_names'])} "
        f"classes" + (f" ({data['n_excluded']} left out by --exclude)"
                      if data.get("n_excluded") else "") + ".",
        f"Embeddings: {data['backbone']} (`{data['weights_id']}`), {data['provenance']}; "
        "no image went through a model for this report beyond what the cache lacked.", "",
        "| finding | found | listed |", "|---|---:|---:|",
        f"| near-duplicate groups across splits (leakage) | {counts['across splits']} | |",
        f"| near-duplicate groups with conflicting labels (some may be across splits too) | "
        f"{counts['conflicting_labels_any']} | |",
        f"| near-duplicate groups in one class | {counts['same class']} | |",
        f"| near-duplicate groups, all | {counts['duplicate_groups']} | "
        f"{min(opts['top'], len(summary['duplicates']))} |",
        f"| likely label errors | {counts['label_errors']} | "
        f"{min(opts['top'], len(summary['label_errors']))} |",
        f"| outliers | {counts['outliers']} | {min(opts['top'], len(summary['outliers']))} |",
        "", f"The tables below list the first {opts['top']} of each (`--top`); audit.json "
        "lists every finding.", "",
    ]
    lines += [f"- {line}" for line in summary["skipped"]] + ([""] if summary["skipped"] else [])
    lines += _duplicates_section(summary, opts, nearest)
    lines += _label_errors_section(summary, opts)
    lines += _outliers_section(summary, opts)
    if "map" in summary["files"]:
        lines += ["## Map of the embeddings", "",
                  f"{opts['map'].upper()} of the normalised embeddings, coloured by class; "
                  "flagged images are marked.", "", f"![map]({MAP_FILE})", ""]
    root, backbone = shlex.quote(data["root"]), shlex.quote(data["backbone"])
    lines += ["## Acting on it", "",
              "Write every flagged file (not only the listed ones) to an exclude list, read "
              "and edit it, then rerun without them (every other image keeps its split; add "
              "the options this audit ran with, such as --cache-dir):", "", "```",
              f"featx audit {root} -b {backbone} --write-exclude exclude.txt",
              f"featx compare {root} -b {backbone} --exclude exclude.txt", "```", ""]
    return "\n".join(lines)


def _duplicates_section(summary, opts, nearest) -> list[str]:
    if opts.get("verify"):
        rule = (f"Each image's {opts['candidates']} nearest neighbours with an embedding "
                f"cosine of at least **{opts['candidate_cosine']}** were checked from the "
                "images: ORB keypoints, Lowe's ratio test and one RANSAC similarity fit; a pair "
                f"is one picture when at least **{opts['min_inliers']}** matches agree with "
                "the fit (measured on real photos with cropped, mirrored, rotated, captioned, "
                "re-encoded and resized copies: benchmarks/audit_copies.py). Groups form from "
                "confirmed pairs only; *copies* says how each was made (same, scaled, "
                "cropped, mirrored). Exact copies (one content hash) are included. ")
    else:
        rule = (f"Two images are near-duplicates when the cosine similarity of their "
                f"embeddings is at least **{opts['threshold']}** "
                f"({summary['threshold']['evidence']}). Exact copies (one content hash) are "
                "included. ")
    lines = ["## Near-duplicates", "", rule]
    if nearest:
        lines[-1] += (f"On this data each image's most similar other image has cosine "
                      f"{nearest['median']:.3f} (median), {nearest['p99']:.3f} (99th "
                      f"percentile); {100 * nearest['share_at_threshold']:.1f}% of the images "
                      "reach the threshold.")
    lines += ["", "Groups *across splits* put one picture in training and in evaluation: "
              "they inflate every score. Leave out copies marked *drop*.", ""]
    if not summary["duplicates"]:
        return lines + ["None found.", ""]
    lines += [f"![duplicates]({SHEETS['duplicates']})", "",
              "| # | kind | cosine | copies | images (label, split) | drop |",
              "|---:|---|---:|---|---|---|"]
    for n, g in enumerate(summary["duplicates"][:opts["top"]], 1):
        kind = g["kind"] + (", exact copies" if g["exact"] else "")
        if g["conflicting_labels"] and g["kind"] != "conflicting labels":
            kind += ", conflicting labels"
        images = _cell([f"`{m['path']}` ({m['label']}, {m['split']})" for m in g["members"]])
        drop = _cell([f"`{p}`" for p in g["exclude"]])
        copies = ", ".join(g.get("copy_kinds", [])) or "-"
        lines.append(f"| {n} | {kind} | {g['similarity']:.3f} | {copies} | {images} | {drop} |")
    return lines + _more(summary["duplicates"], opts)


def _cell(items, at_most: int = 10) -> str:
    """Up to ``at_most`` items in one table cell (a chain of look-alikes can be long)."""
    more = f"<br>and {len(items) - at_most} more (audit.json)" if len(items) > at_most else ""
    return "<br>".join(items[:at_most]) + more


def _label_errors_section(summary, opts) -> list[str]:
    lines = ["## Likely label errors", "",
             f"Out-of-fold probabilities ({opts['folds']}-fold stratified, seed {opts['seed']}; "
             "standardised embeddings, logistic regression): no image is scored by a model "
             "that saw it. Listed: images another class gets more probability than their own, "
             "lowest probability of the given label first.", ""]
    if not summary["label_errors"]:
        return lines + ["None found.", ""]
    lines += [f"![label errors]({SHEETS['label_errors']})", "",
              "| # | image | split | labelled | suggested | p(labelled) | p(suggested) |",
              "|---:|---|---|---|---|---:|---:|"]
    for n, f in enumerate(summary["label_errors"][:opts["top"]], 1):
        lines.append(f"| {n} | `{f['path']}` | {f['split']} | {f['label']} | {f['suggested']} "
                     f"| {f['p_given']:.3f} | {f['p_suggested']:.3f} |")
    return lines + _more(summary["label_errors"], opts)


def _outliers_section(summary, opts) -> list[str]:
    lines = ["## Outliers", "",
             f"Mean cosine distance to the {opts['neighbours']} nearest images of the same "
             f"class, as a robust z-score within the class (median, MAD); listed from z "
             f"{opts['outlier_z']}. Often corrupt, off-topic or mislabelled images.", ""]
    if not summary["outliers"]:
        return lines + ["None found.", ""]
    lines += [f"![outliers]({SHEETS['outliers']})", "",
              "| # | image | class | split | distance | z |", "|---:|---|---|---|---:|---:|"]
    for n, f in enumerate(summary["outliers"][:opts["top"]], 1):
        lines.append(f"| {n} | `{f['path']}` | {f['label']} | {f['split']} | "
                     f"{f['distance']:.3f} | {f['z']:.1f} |")
    return lines + _more(summary["outliers"], opts)


def _more(items, opts) -> list[str]:
    """The line under a table cut to --top: how many more audit.json lists."""
    hidden = len(items) - opts["top"]
    return ["", f"{hidden} more in audit.json.", ""] if hidden > 0 else [""]


# ----- pictures --------------------------------------------------------------------------
def _sheet_title(name, dataset) -> str:
    what = {"duplicates": "near-duplicate groups (one per row)",
            "label_errors": "likely label errors", "outliers": "outliers"}[name]
    return f"{what}: {Path(dataset['root']).name}, {dataset['backbone']}"


def _sheet_cells(name, items) -> list[list[tuple[str, str]]]:
    """Rows of (relative path, caption) for one finding type."""
    if name == "duplicates":
        return [[(m["path"], f"{_short(m['path'])}\n{m['label']}, {m['split']}"
                  + ("\ndrop" if m["path"] in g["exclude"] else "\nkeep")
                  + f", cos {g['similarity']:.3f}"
                  + (f" (+{len(g['members']) - COLUMNS} more)" if k == COLUMNS - 1
                     and len(g["members"]) > COLUMNS else ""))
                 for k, m in enumerate(g["members"][:COLUMNS])] for g in items]
    if name == "label_errors":
        cells = [(f["path"], f"{_short(f['path'])}\nlabelled {f['label']} "
                  f"({f['p_given']:.2f})\nlooks {f['suggested']} ({f['p_suggested']:.2f})")
                 for f in items]
    else:
        cells = [(f["path"], f"{_short(f['path'])}\n{f['label']}, {f['split']}\n"
                  f"z {f['z']:.1f}") for f in items]
    return [cells[i:i + COLUMNS] for i in range(0, len(cells), COLUMNS)]


def _short(path: str, width: int = 26) -> str:
    return path if len(path) <= width else "..." + path[-(width - 3):]


def thumbnail(path) -> np.ndarray:
    """The image as RGB, its longer side ``THUMB`` pixels; grey when it cannot be read."""
    import cv2

    try:
        image = read_image(path)
    except ImageDecodeError:
        return np.full((THUMB, THUMB, 3), 128, np.uint8)
    scale = THUMB / max(image.shape[:2])
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def contact_sheet(rows, root, out_png, title) -> Path:
    """A grid of thumbnails (one list of (path, caption) per row) with a caption under each."""
    from matplotlib.figure import Figure

    columns = max(len(row) for row in rows)
    fig = Figure(figsize=(2.1 * columns, 2.5 * len(rows) + 0.4))
    fig.suptitle(title, fontsize=10)
    for r, row in enumerate(rows):
        for c, (path, caption) in enumerate(row):
            ax = fig.add_subplot(len(rows), columns, r * columns + c + 1)
            ax.imshow(thumbnail(Path(root) / path))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(caption, fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)
    return Path(out_png)


def embedding_map_png(audit, labels, class_names, out_png, top) -> Path:
    """The 2-D map coloured by class, the ``top`` findings of each type marked."""
    from matplotlib.figure import Figure

    coords, labels = audit.coords, np.asarray(labels)
    fig = Figure(figsize=(8, 7))
    ax = fig.add_subplot(1, 1, 1)
    cmap = "tab10" if len(class_names) <= 10 else "tab20" if len(class_names) <= 20 else "turbo"
    ax.scatter(coords[:, 0], coords[:, 1], c=labels, cmap=cmap, s=6, alpha=0.6,
               vmin=0, vmax=max(1, len(class_names) - 1))
    marks = [("duplicates", [i for g in audit.duplicates[:top] for i in g["members"]], "x",
              "black"),
             ("label errors", [f["index"] for f in audit.label_errors[:top]], "o", "red"),
             ("outliers", [f["index"] for f in audit.outliers[:top]], "^", "magenta")]
    for name, rows, marker, color in marks:
        if rows:
            ax.scatter(coords[rows, 0], coords[rows, 1], marker=marker, s=40,
                       facecolors="none" if marker != "x" else color, edgecolors=color
                       if marker != "x" else None, label=f"{name} ({len(rows)})")
    if len(class_names) <= 20:
        for c, name in enumerate(class_names):
            ax.scatter([], [], color=ax.collections[0].cmap(ax.collections[0].norm(c)), s=12,
                       label=str(name))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best", markerscale=1.2)
    ax.set_title(f"{audit.map_method.upper()} of the embeddings; flagged images marked")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    return Path(out_png)
