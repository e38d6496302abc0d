"""Datasets (read from files the user already has, never downloaded), splits across workers, and sampling."""

from prsgd.data.datasets import load_dataset
from prsgd.data.sampling import WorkerSampler
from prsgd.data.splits import label_distribution, partition
from prsgd.data.types import ArraySplit, DataError, Dataset

__all__ = ["ArraySplit", "DataError", "Dataset", "WorkerSampler", "label_distribution", "load_dataset", "partition"]
