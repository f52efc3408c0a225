"""featx: transfer learning by feature extraction.

Frozen ImageNet ConvNet embeddings of a labelled image folder, cached in HDF5, then classical
classifiers (and an optional fine-tuning run) trained and compared on them.
"""

import os

# Doubles TensorFlow's CPU throughput on the machines we measured; it must be set before
# TensorFlow is imported, so it lives here rather than next to the model code.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"

_LAZY = {
    "extract": "featx.extraction",
    "Features": "featx.features",
    "CombinedFeatures": "featx.features",
    "ExtractStats": "featx.features",
    "ExtractOptions": "featx.options",
    "SplitOptions": "featx.options",
    "create_backbone": "featx.backbones",
    "list_backbones": "featx.backbones",
    "discover": "featx.data",
    "fit": "featx.api",
    "predict": "featx.api",
    "compare": "featx.api",
    "audit": "featx.api",
    "AuditOptions": "featx.options",
    "finetune": "featx.finetuning",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    # Lazy so that `import featx` (and the CLI's --help) does not import TensorFlow.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'featx' has no attribute {name!r}")
