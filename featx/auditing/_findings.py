"""The audit's findings with file names: row indices become paths, class names and splits;
which copies of a duplicate group to leave out; the exclude list's entries."""

from __future__ import annotations


def audit_findings(audit, paths, labels, splits, class_names) -> dict:
    """The audit's lists with paths, class names and splits in place of row indices."""
    def image(i):
        return {"path": str(paths[i]), "label": class_names[labels[i]], "split": str(splits[i])}

    duplicates = []
    for group in audit.duplicates:
        members = [image(i) for i in group["members"]]
        found = {"kind": group["kind"], "exact": group["exact"],
                 "conflicting_labels": group["conflicting_labels"],
                 "similarity": round(group["similarity"], 4), "members": members,
                 "exclude": _copies_to_drop(members, group["conflicting_labels"])}
        if "pairs" in group:  # confirmed from the images: how each copy relates
            found["copy_kinds"] = group["copy_kinds"]
            found["pairs"] = [{"a": str(paths[c["a"]]), "b": str(paths[c["b"]]),
                               "kind": c["kind"], "inliers": c["inliers"],
                               "cosine": round(c["cosine"], 4)} for c in group["pairs"]]
        duplicates.append(found)
    label_errors = [{**image(f["index"]), "suggested": class_names[f["suggested"]],
                     "p_given": round(f["p_given"], 4), "p_suggested": round(f["p_suggested"], 4),
                     "probabilities": {class_names[c]: round(p, 4)
                                       for c, p in f["probabilities"].items()}}
                    for f in audit.label_errors]
    outliers = [{**image(f["index"]), "distance": round(f["distance"], 4), "z": round(f["z"], 2)}
                for f in audit.outliers]
    return {"duplicates": duplicates, "label_errors": label_errors, "outliers": outliers}


def _copies_to_drop(members, conflicting) -> list[str]:
    """Which copies of a duplicate group to leave out: all of them when their labels
    disagree (no way to tell which is right), else all but one, a training copy kept."""
    if conflicting:
        return [m["path"] for m in members]
    keep = next((m for m in members if m["split"] == "train"), members[0])
    return [m["path"] for m in members if m is not keep]


def exclude_entries(findings) -> list[tuple[str, str]]:
    """(path, reason) of every flagged file, once each (reasons joined)."""
    reasons = {}
    for group in findings["duplicates"]:
        kept = [m["path"] for m in group["members"] if m["path"] not in group["exclude"]]
        for path in group["exclude"]:
            what = (f"near-duplicate, {group['kind']}, cosine {group['similarity']:.3f}; "
                    + (f"copy of {kept[0]} kept" if kept else "labels disagree, all left out"))
            reasons.setdefault(path, []).append(what)
    for f in findings["label_errors"]:
        reasons.setdefault(f["path"], []).append(
            f"likely label error: labelled {f['label']}, looks like {f['suggested']} "
            f"(p {f['p_given']:.3f} vs {f['p_suggested']:.3f})")
    for f in findings["outliers"]:
        reasons.setdefault(f["path"], []).append(
            f"outlier in class {f['label']} (z {f['z']:.1f})")
    return [(path, "; ".join(why)) for path, why in reasons.items()]


def summary_counts(counts) -> dict:
    """The per-type counts `featx audit --json` prints."""
    return {"duplicates_across_splits": counts["across splits"],
            "duplicates_conflicting_labels": counts["conflicting_labels_any"],
            "duplicates_same_class": counts["same class"],
            "label_errors": counts["label_errors"], "outliers": counts["outliers"]}
