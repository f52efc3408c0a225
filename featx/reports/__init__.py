"""What a reader of ``featx compare`` sees: report.md, report.json and the figures, written
from compare rows and a dataset summary; and the history plot of a fine-tuning run.

Modules, in import order: ``_figures`` (matplotlib figures, no pyplot), ``_markdown``
(report.md's sections), ``_compare_report`` (the files of one compare run).
"""

from ._compare_report import dataset_summary, finetune_notes, write_compare_report
from ._figures import (plot_accuracy_vs_fit_time, plot_confusion, plot_coverage, plot_history,
                       plot_reliability)
from ._markdown import (RANDOM_WEIGHTS_BANNER, RESULT_COLUMNS, backbone_label, extraction_cell,
                        format_params, vs_best_text)

__all__ = [
    "RANDOM_WEIGHTS_BANNER", "RESULT_COLUMNS", "backbone_label", "dataset_summary",
    "extraction_cell", "finetune_notes", "format_params", "plot_accuracy_vs_fit_time",
    "plot_confusion", "plot_coverage", "plot_history", "plot_reliability", "vs_best_text",
    "write_compare_report",
]
