"""The first stage of an image's route: a folder of labelled files -> a manifest (paths,
classes, splits) -> decoded, resized RGB images.

Importing this package imports numpy and cv2, never a framework; the Keras augmentation
layers are the module :mod:`featx.data.augment`, imported where it is used.
"""

from ._exclude import excluded_paths, read_exclude_file, write_exclude_file
from ._folders import IMAGE_EXTENSIONS, Manifest, discover, expand_paths
from ._hashing import hash_files
from ._headers import declared_size, jpeg_size
from ._images import (MAX_IMAGE_PIXELS, load_for_model, max_image_pixels, read_image,
                      resize_and_crop)
from ._sample import write_digits
from ._splits import SPLITS, assign_splits
from featx._io import file_sha256

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "Manifest",
    "SPLITS",
    "assign_splits",
    "declared_size",
    "discover",
    "excluded_paths",
    "expand_paths",
    "file_sha256",
    "hash_files",
    "jpeg_size",
    "load_for_model",
    "max_image_pixels",
    "read_exclude_file",
    "read_image",
    "resize_and_crop",
    "write_digits",
    "write_exclude_file",
]
