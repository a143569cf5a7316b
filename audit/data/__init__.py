"""Image tables, readers and the planted world."""

from audit.data.readers import (
    read_dataset,
    read_fashion_mnist,
    read_imagefolder,
    read_parquet,
    read_world,
)
from audit.data.table import SPLITS, ImageTable

__all__ = [
    "SPLITS",
    "ImageTable",
    "read_dataset",
    "read_fashion_mnist",
    "read_imagefolder",
    "read_parquet",
    "read_world",
]
