"""embtable: compressed embedding tables for recommender systems, sized to a memory budget.

The public API::

    FeatureSpec                      what a feature is (name, num_embeddings, embedding_dim, counts)
    build(features, method, budget)  -> a drop-in for torchrec's EmbeddingBagCollection
    plan(features, method, budget)   -> Plan: the sized config and its exact bytes (pure, allocates nothing)
    EmbeddingBag / Embedding         single-feature stand-ins for nn.EmbeddingBag / nn.Embedding
    compress(model, budget, method)  -> (model, CompressionReport): compressed tables swapped into your model
    export.export / export.load      the trained model as one file a server loads (fp32/fp16/int8/int4 rows)
    memory_report / training_bytes   exact bytes at inference / with an optimizer's state
    sparse_parameters / dense_parameters / RowWiseAdagrad   sparse table updates for training
    fuse_storage / unfuse_storage    train the tables with FBGEMM's fused optimizers (embtable.fused)
    FullConfig, HashConfig, ...      method configs; registered_methods() lists them all
"""

from . import export
from . import methods as _methods  # noqa: F401  (registers the methods)
from .budget import Budget, BudgetError, FeaturePlan, Plan, as_budget, largest_feasible, plan
from .build import build
from .compress import CompressionReport, compress
from .config import (
    MethodConfig,
    OutOfRange,
    Pooling,
    config_class,
    method_class,
    method_config_from_dict,
    register_method,
    registered_methods,
)
from .features import FeatureSpec
from .fused import fuse_storage, unfuse_storage
from .memory import (
    MemoryReport,
    dense_parameters,
    memory_report,
    optimizer_state_bytes,
    sparse_parameters,
    table_parameters,
    training_bytes,
)
from .methods.cafe import CafeConfig, CafeEmbeddingBagCollection
from .methods.dhe import DHEConfig, DHEEmbeddingBagCollection
from .methods.dpq import DPQConfig, DPQEmbeddingBagCollection
from .methods.full import FullConfig, FullEmbeddingBagCollection
from .methods.hash import HashConfig, HashEmbeddingBagCollection
from .methods.low_precision import LowPrecisionConfig, LowPrecisionEmbeddingBagCollection
from .methods.low_rank import (
    LowRankConfig,
    LowRankEmbeddingBagCollection,
    count_second_moments,
    low_rank_from_trained,
    output_second_moments,
)
from .methods.managed_collision import ManagedCollisionConfig, ManagedCollisionEmbeddingBagCollection
from .methods.mgqe import MGQEConfig, MGQEEmbeddingBagCollection
from .methods.mixed_dim import MixedDimConfig, MixedDimEmbeddingBagCollection
from .methods.optembed import OptEmbedConfig, OptEmbedEmbeddingBagCollection
from .methods.pep import PEPConfig, PEPEmbeddingBagCollection
from .methods.qr import QRConfig, QREmbeddingBagCollection
from .methods.robe import RobeConfig, RobeEmbeddingBagCollection
from .methods.tt_rec import TTRecConfig, TTRecEmbeddingBagCollection
from .methods.unified import UnifiedConfig, UnifiedEmbeddingBagCollection
from .module import EmbeddingModule
from .optim import RowWiseAdagrad
from .single import Embedding, EmbeddingBag

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "BudgetError",
    "CafeConfig",
    "CafeEmbeddingBagCollection",
    "CompressionReport",
    "DHEConfig",
    "DHEEmbeddingBagCollection",
    "DPQConfig",
    "DPQEmbeddingBagCollection",
    "Embedding",
    "EmbeddingBag",
    "EmbeddingModule",
    "FeaturePlan",
    "FeatureSpec",
    "FullConfig",
    "FullEmbeddingBagCollection",
    "HashConfig",
    "HashEmbeddingBagCollection",
    "LowPrecisionConfig",
    "LowPrecisionEmbeddingBagCollection",
    "LowRankConfig",
    "LowRankEmbeddingBagCollection",
    "MemoryReport",
    "MGQEConfig",
    "MGQEEmbeddingBagCollection",
    "MethodConfig",
    "ManagedCollisionConfig",
    "ManagedCollisionEmbeddingBagCollection",
    "MixedDimConfig",
    "MixedDimEmbeddingBagCollection",
    "OptEmbedConfig",
    "OptEmbedEmbeddingBagCollection",
    "OutOfRange",
    "PEPConfig",
    "PEPEmbeddingBagCollection",
    "Plan",
    "Pooling",
    "QRConfig",
    "QREmbeddingBagCollection",
    "RobeConfig",
    "RobeEmbeddingBagCollection",
    "RowWiseAdagrad",
    "TTRecConfig",
    "TTRecEmbeddingBagCollection",
    "UnifiedConfig",
    "UnifiedEmbeddingBagCollection",
    "as_budget",
    "build",
    "compress",
    "config_class",
    "count_second_moments",
    "dense_parameters",
    "export",
    "fuse_storage",
    "largest_feasible",
    "low_rank_from_trained",
    "memory_report",
    "method_class",
    "method_config_from_dict",
    "optimizer_state_bytes",
    "output_second_moments",
    "plan",
    "register_method",
    "registered_methods",
    "sparse_parameters",
    "table_parameters",
    "training_bytes",
    "unfuse_storage",
]
