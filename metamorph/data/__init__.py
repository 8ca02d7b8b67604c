"""Data layer: CIFAR readers, the embedded mini data set, GPU-friendly transforms and the
Lightning data module."""

from .datamodule import CIFARDataModule, stratified_indices
from .embedded import available_embedded, load_embedded
from .sources import (
    ArraySplit,
    CifarArrays,
    DataError,
    default_cache_dir,
    download_cifar,
    load_cifar,
)
from .transforms import hwc_to_nchw, normalize, random_crop_flip

__all__ = [
    "ArraySplit",
    "CIFARDataModule",
    "CifarArrays",
    "DataError",
    "available_embedded",
    "default_cache_dir",
    "download_cifar",
    "hwc_to_nchw",
    "load_cifar",
    "load_embedded",
    "normalize",
    "random_crop_flip",
    "stratified_indices",
]
