"""Multi-turn long-context benchmark: datasets (11 x 3 question positions) and metrics.

- :mod:`loopserve.bench.metrics`: F1, ROUGE-L, accuracy variants, substring match,
  edit similarity, and the :func:`score` dispatcher.
- :mod:`loopserve.bench.datasets`: the dataset registry (:data:`DATASETS`),
  :func:`build_datasets` and the validating JSONL readers.
"""

from .datasets import (
    DATASETS,
    POSITIONS,
    DatasetFormatError,
    DatasetInfo,
    approx_token_count,
    build_conversations,
    build_datasets,
    dataset_info,
    dataset_path,
    iter_conversations,
    load_dataset,
)
from .metrics import METRICS, normalize_answer, score

__all__ = [
    "DATASETS",
    "METRICS",
    "POSITIONS",
    "DatasetFormatError",
    "DatasetInfo",
    "approx_token_count",
    "build_conversations",
    "build_datasets",
    "dataset_info",
    "dataset_path",
    "iter_conversations",
    "load_dataset",
    "normalize_answer",
    "score",
]
