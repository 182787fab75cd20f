"""The multi-turn long-context benchmark's datasets (SPEC section 4).

- :mod:`.registry`: one entry per dataset (:data:`REGISTRY`, public view :data:`DATASETS`);
- :mod:`.common`: the record types a builder and an entry use;
- :mod:`.leval`, :mod:`.squad`, :mod:`.gsm`, :mod:`.passkey`: the builders;
- :mod:`.build`: fitting conversations to a length and writing the JSONL files.

See ``docs/benchmark.md`` for the per-dataset constructions and the schema.
"""

from ..schema import POSITIONS, DatasetFormatError, iter_conversations, load_dataset
from .build import approx_token_count, build_conversations, build_datasets
from .common import DatasetInfo
from .registry import DATASETS, REGISTRY, dataset_info, dataset_path

__all__ = [
    "DATASETS",
    "POSITIONS",
    "REGISTRY",
    "DatasetFormatError",
    "DatasetInfo",
    "approx_token_count",
    "build_conversations",
    "build_datasets",
    "dataset_info",
    "dataset_path",
    "iter_conversations",
    "load_dataset",
]
