"""GTPT (Group-based Token Pruning Transformer, ECCV 2024): the lean model on gtpt_kernels ops."""
from .config import GTPTConfig, VARIANTS, get_config, list_variants
from .model import GTPT, TrainOutput, build_model, num_trainable_parameters

__all__ = ["GTPTConfig", "VARIANTS", "get_config", "list_variants", "GTPT", "TrainOutput", "build_model",
           "num_trainable_parameters"]
