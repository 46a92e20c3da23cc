"""CTR models that take any ``EmbeddingBagCollectionInterface`` (full or compressed) and return logits.

Every model has the call ``model(dense_features [B, num_dense], sparse_features: KeyedJaggedTensor) ->
logits [B]`` and is built from the blocks in ``ctr_models.blocks``. ``build_model(name, ...)`` picks one
by name.
"""

from ctr_models.blocks import MLP, CrossNetV2, DotInteraction, FMInteraction
from ctr_models.dcn import DCNv2
from ctr_models.deepfm import DeepFM
from ctr_models.dlrm import DLRM
from ctr_models.layout import PooledLayout
from ctr_models.registry import MODELS, build_model, model_names, model_options
from ctr_models.wide_deep import WideDeep

__all__ = [
    "DLRM",
    "DCNv2",
    "DeepFM",
    "WideDeep",
    "MLP",
    "CrossNetV2",
    "DotInteraction",
    "FMInteraction",
    "PooledLayout",
    "MODELS",
    "build_model",
    "model_names",
    "model_options",
]
