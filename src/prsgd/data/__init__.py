"""Datasets (read from files the user already has, never downloaded) and how workers sample from them."""

from prsgd.data.datasets import Dataset, load_dataset
from prsgd.data.sampling import WorkerSampler

__all__ = ["Dataset", "WorkerSampler", "load_dataset"]
