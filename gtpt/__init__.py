"""GTPT (Group-based Token Pruning Transformer, ECCV 2024): the lean model on gtpt_kernels ops."""
from .checkpoint import CheckpointError, load_official_checkpoint, save_checkpoint
from .config import GTPTConfig, VARIANTS, get_config, list_variants
from .model import GTPT, TrainOutput, build_model, num_trainable_parameters
from .summary import summary as model_summary
from .summary import token_schedule

__all__ = ["GTPTConfig", "VARIANTS", "get_config", "list_variants", "GTPT", "TrainOutput", "build_model",
           "num_trainable_parameters", "load_official_checkpoint", "save_checkpoint", "CheckpointError",
           "model_summary", "token_schedule"]
