"""The data audit: what is wrong with a labelled image set, found from its cached embeddings
(near-duplicates and leakage across splits, likely label errors, outliers) and, for
near-duplicates, confirmed from the images themselves; written as a report with thumbnails
and as an exclude list to act on.

Modules, in import order: ``_copies`` (is a pair one picture? local features and a
geometric fit), ``_checks`` (arrays in, row indices out), ``_findings`` (row indices become
files), ``_report`` (audit.md, audit.json and the pictures).
"""

from ._copies import COPY_KINDS, CopyVerifier, LocalFeatureStore, orb_features
from ._checks import (KINDS, Audit, audit_rows, candidate_pairs, duplicate_components,
                      duplicate_groups, embedding_map, fold_groups, label_issues,
                      near_duplicates, normalized, outliers, verified_pairs)
from ._findings import audit_findings, exclude_entries, summary_counts
from ._report import audit_json, audit_markdown, embedding_map_png, write_audit_report

__all__ = [
    "Audit", "COPY_KINDS", "CopyVerifier", "KINDS", "LocalFeatureStore", "audit_findings",
    "audit_json", "audit_markdown", "audit_rows", "candidate_pairs", "duplicate_components",
    "duplicate_groups", "embedding_map", "embedding_map_png", "exclude_entries",
    "fold_groups", "label_issues", "near_duplicates", "normalized", "orb_features",
    "outliers", "summary_counts", "verified_pairs", "write_audit_report",
]
