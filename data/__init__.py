"""Data layer: loaders, splits, derived features, synthetic logs and request batches."""

from cascade.data.dataset import DataError, Dataset, FeatureTable

__all__ = ["DataError", "Dataset", "FeatureTable"]
