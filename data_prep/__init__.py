"""data_prep: raw Criteo / Avazu files or a calibrated generator -> parquet dataset directories.

The public API::

    generate_dataset(preset_or_config, out_dir)   the generator straight to a dataset directory
    generate_tsv(preset_or_config, path)          the same rows as Criteo train.txt text (.gz ok)
    PRESETS, GeneratorConfig                      "tiny" (tests), "demo" (make demo), "standard", "*_multihot"
    convert_criteo(inputs, out_dir, protocol=)    Criteo Kaggle train.txt / 1TB day files
    convert_avazu(input, out_dir)                 Avazu train CSV
    prepare_table(files, out_dir, label=)         any parquet / CSV table (single-, multi-hot, dense columns)
    load_meta(path) -> DatasetMeta                schema, num_embeddings, splits, counts, feature_specs()
    BatchLoader(path, split, batch_size)          TorchRec Batch iterator, shuffled per epoch

Command line: ``python -m data_prep --help``.
"""

from .convert import TooManyMalformedError, convert_avazu, convert_criteo
from .generator import PRESETS, GeneratorConfig, Teacher, generate_dataset, generate_tsv
from .loader import BatchLoader, CorruptShardError
from .meta import SPLITS, DataPrepError, DatasetMeta, load_meta
from .table import prepare_table
from .textparse import MALFORMED_KINDS, MalformedRowError

__all__ = [
    "BatchLoader",
    "CorruptShardError",
    "DataPrepError",
    "DatasetMeta",
    "GeneratorConfig",
    "MALFORMED_KINDS",
    "MalformedRowError",
    "PRESETS",
    "SPLITS",
    "Teacher",
    "TooManyMalformedError",
    "convert_avazu",
    "convert_criteo",
    "generate_dataset",
    "generate_tsv",
    "load_meta",
    "prepare_table",
]
