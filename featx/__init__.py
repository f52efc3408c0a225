"""featx: transfer learning by feature extraction.

Frozen ImageNet ConvNet embeddings of a labelled image folder, cached in HDF5, then classical
classifiers (and an optional fine-tuning run) trained and compared on them.
"""

import os

# Doubles TensorFlow's CPU throughput on the machines we measured; it must be set before
# TensorFlow is imported, so it lives here rather than next to the model code.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
# TensorFlow's C++ log level, also read at import: whether the user chose one is kept, so
# that the CLI's quiet default and its -v leave a chosen level alone.
TF_LOG_LEVEL_CHOSEN = "TF_CPP_MIN_LOG_LEVEL" in os.environ
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"

# The public names: the API's functions and the types they take and return. Lazy, so
# that `import featx` (and the CLI's --help) imports no framework.
_LAZY = {
    **dict.fromkeys(["extract", "fit", "predict", "compare", "audit", "finetune", "export",
                     "list_caches", "cache_info", "compact_cache", "verify_cache",
                     "export_embeddings", "augment_preview", "demo", "convert_model"],
                    "featx.api"),
    **dict.fromkeys(["Features", "CombinedFeatures", "ExtractStats"], "featx.cache"),
    **dict.fromkeys(["ExtractOptions", "SplitOptions", "AuditOptions", "AugmentOptions"],
                    "featx.options"),
    **dict.fromkeys(["create_backbone", "list_backbones"], "featx.backbones"),
    "discover": "featx.data",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    # Lazy so that `import featx` (and the CLI's --help) does not import TensorFlow.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'featx' has no attribute {name!r}")
