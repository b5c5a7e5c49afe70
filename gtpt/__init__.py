"""GTPT (Group-based Token Pruning Transformer, ECCV 2024): the lean model on gtpt_kernels ops.

Names are imported on first use (PEP 562), so ``import gtpt`` (and ``gtpt --help``) does not import torch until
a model, checkpoint or estimator is asked for.
"""
from importlib import import_module
from typing import Any

_LAZY = {
    "CheckpointError": ".checkpoint", "load_official_checkpoint": ".checkpoint", "save_checkpoint": ".checkpoint",
    "GTPTConfig": ".config", "VARIANTS": ".config", "get_config": ".config", "list_variants": ".config",
    "GTPT": ".model", "TrainOutput": ".model", "build_model": ".model", "num_trainable_parameters": ".model",
    "model_summary": (".summary", "summary"), "token_schedule": ".summary",
    "PoseEstimator": ".inference", "draw_keypoints": ".inference",
}

__all__ = ["GTPTConfig", "VARIANTS", "get_config", "list_variants", "GTPT", "TrainOutput", "build_model",
           "num_trainable_parameters", "load_official_checkpoint", "save_checkpoint", "CheckpointError",
           "model_summary", "token_schedule", "PoseEstimator", "draw_keypoints"]


def __getattr__(name: str) -> Any:
    spec = _LAZY.get(name)
    if spec is None:
        if not name.startswith("_"):
            try:  # a submodule (gtpt.model, gtpt.checkpoint, ...), as the eager imports used to provide them
                return import_module(f".{name}", __name__)
            except ModuleNotFoundError as e:
                if e.name != f"{__name__}.{name}":
                    raise
        raise AttributeError(f"module 'gtpt' has no attribute {name!r}")
    module, attr = spec if isinstance(spec, tuple) else (spec, name)
    value = getattr(import_module(module, __name__), attr)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
