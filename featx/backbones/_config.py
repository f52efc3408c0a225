"""The per-backbone configuration record."""

from __future__ import annotations

from dataclasses import dataclass

NORMALIZATIONS = ("lite", "tf", "caffe", "torch", "none")
POOLINGS = ("avg", "max", "flatten")


def resize_size_for(input_size: int) -> int:
    """Shorter side before the centre crop: the usual 0.875 crop fraction."""
    return round(input_size / 0.875)


@dataclass(frozen=True)
class BackboneCfg:
    """Static description of a backbone; building one costs nothing.

    Attributes follow ``docs/architecture.md``. ``min_input_size`` is the
    smallest square input the architecture accepts.
    """

    name: str
    family: str
    input_size: int
    resize_size: int
    interpolation: str
    normalization: str
    num_features: int
    default_layer: str | None
    default_pooling: str
    weights_source: str
    offline: bool
    license: str
    num_classes: int = 1000
    min_input_size: int = 32

    def __post_init__(self):
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"{self.name}: unknown normalization {self.normalization!r}")
        if self.default_pooling not in POOLINGS:
            raise ValueError(f"{self.name}: unknown pooling {self.default_pooling!r}")
