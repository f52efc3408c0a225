"""A labelled image folder that exists on any machine: scikit-learn's bundled digits."""

from __future__ import annotations

from pathlib import Path


def write_digits(root, size: int = 64) -> Path:
    """Write the 1797 8x8 digits of ``sklearn.datasets.load_digits`` as PNG class folders.

    Each digit is scaled to 0-255, inverted to dark ink on white paper and enlarged to
    ``size`` pixels with nearest-neighbour interpolation. Existing files are kept.
    """
    import cv2
    import numpy as np
    from sklearn.datasets import load_digits

    root = Path(root)
    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        path = root / f"digit_{label}" / f"{i:04d}.png"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = 255 - np.round(image * (255 / 16)).astype(np.uint8)
        pixels = cv2.resize(pixels, (size, size), interpolation=cv2.INTER_NEAREST)
        cv2.imwrite(str(path), pixels)
    return root
