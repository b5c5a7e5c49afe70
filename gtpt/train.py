"""Training GTPT as the official code does, plus what a shared cluster needs: AMP, DDP, exact resume.

Conventions copied from the official repository (github.com/haonanwang0522/GTPT @ f3a6068), as
``shared/reference/gtpt-reference.md`` §6-7 records them:

* loss: :class:`gtpt.loss.GlobalPerceivedLoss` on both passes of one forward (``lib/core/loss.py``);
* Adam, lr 1e-3, no weight decay; MultiStepLR x0.1 at epochs [200, 260], **stepped at the start of every epoch**
  (``tools/train.py``), so each decay takes effect one epoch early (epoch index 199 and 259); 300 epochs, batch 64 per
  GPU, seed 42, validation every 5 epochs (``epoch % 5 == 4``);
* EMA over the whole state dict (BN running stats included) after every optimizer step, momentum
  ``1 - (1 - 0.996) * (1 + cos(pi * t / T)) / 2``, ``T = epochs * iters_per_epoch`` (``lib/core/function.py:
  cosine_scheduler``, ``train_sa_simdr``); validation and the exported weights use the EMA;
* curriculum body -> whole-body: the body checkpoint's EMA copy initialises the WholeBody student (strict=False),
  then the EMA is re-copied from it (``TokenPose_S.init_weights`` in ``pose_gtpt_*_wholebody.py``).

Launch one process per GPU with ``torchrun``; ``WORLD_SIZE > 1`` turns on DDP (NCCL on CUDA, gloo on CPU), each
process then takes ``batch_size`` samples per step. Checkpoints: ``last.pth`` (everything needed to resume, written
every epoch and when SIGINT/SIGTERM arrives), ``model_final.pth`` and ``best.pth`` in the official layout (student
keys + ``ema_``-prefixed EMA keys), loadable with :func:`gtpt.load_official_checkpoint`.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from gtpt_kernels.backend import BACKENDS

from . import profiler
from .checkpoint import (CheckpointError, read_checkpoint, read_model_state_dict, save_checkpoint, select_ema,
                         unwrap_state_dict)
from .cli_options import int_at_least
from .config import get_config
from .loss import GlobalPerceivedLoss
from .model import build_model

__all__ = ["TrainConfig", "ModelEMA", "CocoValidator", "official_state_dict", "init_from_checkpoint", "init_joint_tokens",
           "make_optimizer",
           "make_scheduler", "advance_scheduler", "train", "main", "CHECKPOINT_FORMAT", "TrainError", "TrainUsageError",
           "default_workers", "AUGMENTATIONS", "SYNTH_DEFAULTS"]

CHECKPOINT_FORMAT = "gtpt-train-v1"
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
ValFn = Callable[[nn.Module, int], Mapping[str, float]]
# Training augmentation strength (TopDownDataset options); "official" is the official yaml's.
AUGMENTATIONS: Dict[str, Dict[str, float]] = {
    "official": {"scale_factor": 0.35, "rotation_factor": 45.0, "half_body_prob": 0.3},
    "light": {"scale_factor": 0.2, "rotation_factor": 15.0, "half_body_prob": 0.0},
    "none": {"scale_factor": 0.0, "rotation_factor": 0.0, "half_body_prob": 0.0},
}


class TrainError(RuntimeError):
    """A run that cannot start or go on (bad data file, unreadable or foreign ``last.pth``, ...). The message is one
    line naming the command-line flag or file and what to do; ``gtpt train`` prints it and exits with
    ``exit_code``."""
    exit_code = 1


class TrainUsageError(TrainError):
    """A bad or missing argument (exit code 2, as argparse's errors)."""
    exit_code = 2


def default_workers() -> int:
    """DataLoader workers when none are asked for: what the machine has, minus one core for the training process,
    at most 4 (the official setting); 0 (load in the main process) on one core. torch warns when more workers
    than usable cores are started."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(0, min(4, cores - 1))


# ----------------------------------------------------------------------------------------------------------------
# Configuration

@dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults are the official COCO schedule (per-process batch: 4 GPUs x 64 = 256)."""
    variant: str
    output_dir: str
    train_ann_file: Optional[str] = None     # COCO-style keypoint json; unused when train() gets a dataset
    train_image_root: Optional[str] = None
    val_ann_file: Optional[str] = None       # COCO validation (CocoValidator) when train() gets no val_fn
    val_image_root: Optional[str] = None
    val_detections_file: Optional[str] = None
    epochs: int = 300
    batch_size: int = 64                     # per process
    lr: float = 1e-3
    lr_milestones: Tuple[int, ...] = (200, 260)
    lr_gamma: float = 0.1
    ema_momentum: float = 0.996
    ema_schedule: str = "cosine"             # "cosine": momentum rises to 1 (official); "constant": held at ema_momentum
    warmup_steps: int = 0                    # linear lr warm-up over the first N optimizer steps (official: none)
    amp: str = "none"                        # "none" | "bf16" | "fp16" (fp16 adds a GradScaler)
    workers: int = dataclasses.field(default_factory=default_workers)  # min(4, usable cores - 1)
    seed: int = 42
    backend: str = "auto"
    val_every: int = 5
    log_every: int = 100                     # official PRINT_FREQ
    max_steps: Optional[int] = None          # stop after this many optimizer steps in total (smoke runs)
    init_from: Optional[str] = None          # curriculum: body checkpoint whose EMA initialises the student
    resume: bool = True                      # continue from output_dir/last.pth when it exists
    grad_clip: Optional[float] = None        # max grad norm; the official recipe has none
    joint_token_std: Optional[float] = None  # from-scratch std of the keypoint/part tokens (None: official .02)
    best_metric: str = "AP"                  # val_fn key that selects best.pth (higher is better)
    flip: bool = True                        # flip augmentation in training and flip test in validation
    augment: str = "official"                # training augmentation strength: a key of AUGMENTATIONS

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"TrainConfig: {msg}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        object.__setattr__(self, "variant", get_config(self.variant).name)  # raises on unknown names
        need(isinstance(self.output_dir, (str, os.PathLike)) and os.fspath(self.output_dir) != "",
             "output_dir must be a non-empty path")
        object.__setattr__(self, "output_dir", os.fspath(self.output_dir))
        for name in ("epochs", "batch_size", "val_every", "log_every"):
            need(is_int(getattr(self, name)) and getattr(self, name) >= 1,
                 f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        need(is_int(self.workers) and self.workers >= 0, f"workers must be an integer >= 0, got {self.workers!r}")
        need(is_int(self.seed) and self.seed >= 0, f"seed must be an integer >= 0, got {self.seed!r}")
        need(is_num(self.lr) and self.lr > 0, f"lr must be a finite number > 0, got {self.lr!r}")
        need(is_num(self.lr_gamma) and 0 < self.lr_gamma <= 1, f"lr_gamma must be in (0, 1], got {self.lr_gamma!r}")
        milestones = tuple(self.lr_milestones) if isinstance(self.lr_milestones, (list, tuple)) else None
        need(milestones is not None and all(is_int(m) and m >= 1 for m in milestones)
             and list(milestones) == sorted(set(milestones)),
             f"lr_milestones must be strictly increasing epochs >= 1, got {self.lr_milestones!r}")
        object.__setattr__(self, "lr_milestones", milestones)
        need(is_num(self.ema_momentum) and 0 <= self.ema_momentum <= 1,
             f"ema_momentum must be in [0, 1], got {self.ema_momentum!r}")
        need(self.ema_schedule in ("cosine", "constant"),
             f"ema_schedule must be cosine or constant, got {self.ema_schedule!r}")
        need(is_int(self.warmup_steps) and self.warmup_steps >= 0,
             f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        need(self.amp in AMP_DTYPES, f"amp must be one of {', '.join(AMP_DTYPES)}, got {self.amp!r}")
        need(self.backend in BACKENDS, f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        need(self.max_steps is None or (is_int(self.max_steps) and self.max_steps >= 1),
             f"max_steps must be None or an integer >= 1, got {self.max_steps!r}")
        need(self.grad_clip is None or (is_num(self.grad_clip) and self.grad_clip > 0),
             f"grad_clip must be None or a number > 0, got {self.grad_clip!r}")
        need(self.joint_token_std is None or (is_num(self.joint_token_std) and self.joint_token_std > 0),
             f"joint_token_std must be None or a number > 0, got {self.joint_token_std!r}")
        need(isinstance(self.resume, bool), f"resume must be a bool, got {self.resume!r}")
        need(isinstance(self.best_metric, str) and self.best_metric != "", "best_metric must be a non-empty string")
        need(isinstance(self.flip, bool), f"flip must be a bool, got {self.flip!r}")
        need(self.augment in AUGMENTATIONS, f"augment must be one of {', '.join(AUGMENTATIONS)}, got {self.augment!r}")
        need((self.train_ann_file is None) == (self.train_image_root is None),
             "give train_ann_file and train_image_root together")
        need((self.val_ann_file is None) == (self.val_image_root is None),
             "give val_ann_file and val_image_root together")
        need(self.val_detections_file is None or self.val_ann_file is not None,
             "val_detections_file needs val_ann_file and val_image_root")
        for name in ("train_ann_file", "train_image_root", "val_ann_file", "val_image_root", "val_detections_file",
                     "init_from"):
            v = getattr(self, name)
            need(v is None or (isinstance(v, (str, os.PathLike)) and os.fspath(v) != ""),
                 f"{name} must be None or a non-empty path, got {v!r}")
            if v is not None:
                object.__setattr__(self, name, os.fspath(v))

    def to_dict(self) -> Dict[str, Any]:
        """Plain values only (stored in checkpoints, which load with ``weights_only=True``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"TrainConfig: unknown fields {unknown}")
        return cls(**dict(d))


# ----------------------------------------------------------------------------------------------------------------
# EMA, optimizer, scheduler

def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DDP / DataParallel wrapper."""
    return model.module if isinstance(model, (DistributedDataParallel, nn.DataParallel)) else model


class ModelEMA:
    """Exponential moving average of the whole state dict, as ``train_sa_simdr`` does it: after every optimizer step
    ``ema = m * ema + (1 - m) * student`` for every float tensor (parameters, frozen PE and BN running stats alike),
    with ``m_t = 1 - (1 - m0) * (1 + cos(pi * t / T)) / 2`` rising from ``m0`` (t = 0) to 1 (t = T). Integer buffers
    (``num_batches_tracked``) are copied. ``module`` is a frozen eval-mode copy: the model that is validated and
    exported."""

    def __init__(self, model: nn.Module, base_momentum: float = 0.996, total_steps: int = 1, ramp: bool = True):
        if not 0.0 <= base_momentum <= 1.0:
            raise ValueError(f"base_momentum must be in [0, 1], got {base_momentum}")
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.module = copy.deepcopy(unwrap_model(model)).eval().requires_grad_(False)
        self.base_momentum = float(base_momentum)
        self.total_steps = int(total_steps)
        self.ramp = bool(ramp)   # False: the momentum stays at base_momentum (no cosine rise to 1)

    def momentum(self, step: int) -> float:
        """m at global iteration ``step`` (0-based, official ``epoch * iters_per_epoch + i``); held at 1 past T."""
        if not self.ramp:
            return self.base_momentum
        t = min(max(int(step), 0), self.total_steps)
        return 1.0 - (1.0 - self.base_momentum) * (1.0 + math.cos(math.pi * t / self.total_steps)) / 2.0

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> float:
        """Blend the student into the EMA with the momentum of ``step``; returns that momentum."""
        m = self.momentum(step)
        src = unwrap_model(model).state_dict()
        dst = self.module.state_dict()
        if src.keys() != dst.keys():
            raise ValueError("EMA and student state dicts differ in keys: "
                             f"{sorted(set(src) ^ set(dst))[:8]}")
        ema_floats: List[Tensor] = []
        student_floats: List[Tensor] = []
        for k, e in dst.items():
            if e.is_floating_point():
                ema_floats.append(e)
                student_floats.append(src[k].detach())
            else:
                e.copy_(src[k])
        # ema + (1 - m) * (student - ema): the official m * ema + (1 - m) * student, but a tensor equal in both (the
        # frozen PE, an untouched bias) stays bit-identical instead of drifting by rounding. One fused foreach call
        # instead of a kernel per tensor, as torch.optim.swa_utils does for its EMA.
        torch._foreach_lerp_(ema_floats, student_floats, 1.0 - m)
        return m

    def state_dict(self) -> Dict[str, Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, sd: Mapping[str, Tensor]) -> None:
        self.module.load_state_dict(sd, strict=True)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam, lr ``cfg.lr``, default betas, no weight decay (the yaml WD is ignored for adam in ``get_optimizer``)."""
    return torch.optim.Adam([p for p in unwrap_model(model).parameters() if p.requires_grad], lr=cfg.lr)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.MultiStepLR:
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(cfg.lr_milestones), cfg.lr_gamma)


def advance_scheduler(scheduler: torch.optim.lr_scheduler.LRScheduler, epoch: int) -> None:
    """Step the scheduler at the start of 0-based ``epoch`` like ``tools/train.py`` (``lr_scheduler.step()`` first
    thing in the epoch loop): during epoch e its counter is e + 1, so a milestone M decays the lr from epoch index
    M - 1 on, one epoch early. Idempotent, so resuming inside an epoch does not step twice."""
    with warnings.catch_warnings():
        # the official order steps the scheduler before the epoch's first optimizer step, on purpose
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        while scheduler.last_epoch < epoch + 1:
            scheduler.step()


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint layouts and the curriculum init

def official_state_dict(model: nn.Module, ema: Union[ModelEMA, nn.Module]) -> Dict[str, Tensor]:
    """The official checkpoint layout: student keys (``features.*``, ``mlp_head_x/y.*``) plus the EMA copy under the
    same names prefixed ``ema_`` (``ema_features.*``, ...), CPU tensors."""
    student = unwrap_model(model).state_dict()
    averaged = (ema.module if isinstance(ema, ModelEMA) else unwrap_model(ema)).state_dict()
    out = {k: v.detach().cpu() for k, v in student.items()}
    out.update({f"ema_{k}": v.detach().cpu() for k, v in averaged.items()})
    return out


def init_joint_tokens(model: nn.Module, std: float) -> None:
    """Re-draw the learnable keypoint and part tokens (``keypoint_token``, WholeBody's ``extra_token`` and
    ``fine_keypoint_token``; not the human token) from a truncated normal of ``std`` (cut at 2 std).

    Why: every keypoint token starts as the human token plus its own embedding, and the official embeddings
    (std .02) are tiny next to the human token, so at first all joints carry nearly the same token and predict the
    same place; on a 2-core CPU's budget of steps training sits on that plateau (all 17 joints on a few shared
    positions, loss ~0.020 for 100+ steps of 8 images; measured 2026-12-01). Distinct tokens from the start let
    each joint fit its own position within tens of steps (README, "Training without COCO"). Weights keep their
    names and shapes, so checkpoints stay official; a resumed or ``init_from`` run takes its tokens from there."""
    f = unwrap_model(model).features
    with torch.no_grad():
        for name in ("keypoint_token", "extra_token", "fine_keypoint_token"):
            t = getattr(f, name, None)
            if t is not None:
                nn.init.trunc_normal_(t, std=std, a=-2.0 * std, b=2.0 * std)


def init_from_checkpoint(model: nn.Module, checkpoint: Union[str, os.PathLike, Mapping[str, Any]]
                         ) -> Dict[str, Any]:
    """Curriculum init: load a checkpoint's EMA copy (official layout, or one of ours) into ``model``.

    The official WholeBody ``init_weights(PRETRAINED)`` keeps the ``ema_*`` keys, strips the prefix and calls
    ``load_state_dict(strict=False)``. Here strict=False is made explicit: tensors the model has but the checkpoint
    lacks stay as initialised and are reported as ``new`` (for body -> WholeBody: ``features.extra_token`` and
    ``features.fine_keypoint_token``); checkpoint tensors the model lacks are reported as ``ignored``; any shape
    mismatch, or no overlap at all, raises :class:`CheckpointError` before the model is touched. Build the EMA from
    the model afterwards (``train`` does), as the official code re-copies it.
    """
    name = os.fspath(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "<state dict>"
    raw = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    full = unwrap_state_dict(raw)
    source = "ema" if any(k.startswith("ema_") for k in full) else "student"
    sd = read_model_state_dict(full, use_ema=True)
    target = unwrap_model(model)
    own = target.state_dict()
    loaded = [k for k in own if k in sd]
    new = sorted(set(own) - set(sd))
    ignored = sorted(set(sd) - set(own))
    wrong = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                   for k in loaded if sd[k].shape != own[k].shape)
    model_name = getattr(getattr(target, "cfg", None), "name", type(target).__name__)
    if wrong:
        raise CheckpointError(f"{name} cannot initialise {model_name}: {len(wrong)} tensors differ in shape "
                              f"(another model size?): " + "; ".join(wrong[:8]) + (" ..." if len(wrong) > 8 else ""))
    if not loaded:
        raise CheckpointError(f"{name} shares no tensor name with {model_name}: not a GTPT checkpoint?")
    bad = [k for k in loaded if sd[k].is_floating_point() != own[k].is_floating_point()
           or (sd[k].is_floating_point() and not torch.isfinite(sd[k]).all())]
    if bad:
        raise CheckpointError(f"{name}: tensors with an incompatible dtype or NaN/Inf values: {bad[:8]}")
    target.load_state_dict({k: sd[k] for k in loaded}, strict=False)
    return {"checkpoint": name, "source": source, "loaded": len(loaded), "new": new, "ignored": ignored}


# ----------------------------------------------------------------------------------------------------------------
# Process setup: distributed, seeds, RNG states, signals

@dataclass(frozen=True)
class _Dist:
    rank: int
    world_size: int
    owns_group: bool   # we called init_process_group, so we destroy it


def _setup_distributed(device: Optional[Union[str, torch.device]]) -> Tuple[_Dist, torch.device]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; a caller may also have initialised the process group itself."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    initialised = dist.is_available() and dist.is_initialized()
    if world <= 1 and not (initialised and dist.get_world_size() > 1):
        default = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device if device is not None else default)
        if dev.type == "cuda" and dev.index is not None:
            torch.cuda.set_device(dev)  # Triton launches on the current device, not the tensors'
        return _Dist(0, 1, False), dev
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        dev = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not initialised:
        # rank 0 validates alone while the others wait in a barrier: allow a long COCO evaluation
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(hours=1))
    return _Dist(dist.get_rank(), dist.get_world_size(), not initialised), dev


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)  # CPU and every CUDA device


def _seed_worker(worker_id: int) -> None:
    """DataLoader workers: numpy and random follow the worker's torch seed (itself from the per-epoch generator)."""
    s = torch.initial_seed() % 2 ** 32
    np.random.seed(s)
    random.seed(s)


def _rng_state(device: torch.device) -> Dict[str, Any]:
    """Global RNG states as plain values and tensors (checkpoints load with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": random.getstate()}


def _set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_last_stop_signal: List[int] = []  # the stop signal that interrupted the last train() call (main() acts on SIGTERM)


def _interrupt(signum, frame) -> None:
    _last_stop_signal[:] = [signum]
    raise KeyboardInterrupt


@contextlib.contextmanager
def _record_stop_signals() -> Iterator[None]:
    """Inside ``profiler.interrupt_on_stop_signals``: the same KeyboardInterrupt, with the signal noted."""
    if not _main_thread():
        yield
        return
    _last_stop_signal.clear()
    previous = {s: signal.signal(s, _interrupt) for s in _STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _hold_stop_signals() -> Iterator[None]:
    """Defer a stop signal until the block ends: the optimizer step, EMA update and step counters commit together, so
    an interrupt never saves a half-updated state."""
    if not _main_thread():
        yield
        return
    pending: List[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in _STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if pending:
        _last_stop_signal[:] = pending[:1]
        raise KeyboardInterrupt


# ----------------------------------------------------------------------------------------------------------------
# Data

class _EpochSampler(Sampler[int]):
    """This rank's share of an epoch in DistributedSampler's seeded order (``seed + epoch``; also for one process),
    minus the first ``skip`` indices when a run resumes inside an epoch."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int):
        self.inner = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                                        drop_last=False)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.inner)[self.skip:])

    def __len__(self) -> int:
        return max(len(self.inner) - self.skip, 0)


def _default_train_dataset(cfg: TrainConfig) -> Dataset:
    if cfg.train_ann_file is None:
        raise TrainUsageError("no training data: give --train-ann-file and --train-image-root (a COCO keypoint "
                              "annotation file and its image folder), or run 'gtpt train' without data options to "
                              "train on the generated synthetic dataset")
    from .data import AnnotationError, TopDownDataset  # the data pipeline is only needed without a given dataset
    try:
        return TopDownDataset(cfg.train_ann_file, cfg.train_image_root,
                              num_keypoints=get_config(cfg.variant).num_keypoints, train=True, seed=cfg.seed,
                              flip=cfg.flip, **AUGMENTATIONS[cfg.augment])
    except AnnotationError as e:
        raise TrainError(f"--train-ann-file: {e}") from None


class CocoValidator:
    """The default ``val_fn`` when the config has validation paths: COCO keypoint AP of the EMA model through
    :func:`gtpt.evaluate.evaluate` (flip test, rescoring, OKS-NMS: the official ``validate_sa_simdr`` +
    ``coco.evaluate``), on ``val_detections_file`` boxes when given, else GT boxes. Returns flat metrics: the COCO
    stats (``AP``, ``AP50``, ...); for WholeBody ``<part>_<stat>`` for every part and ``AP`` / ``AR`` = whole-body.
    The dataset is built on the first call (only rank 0 validates)."""

    def __init__(self, cfg: TrainConfig):
        if cfg.val_ann_file is None:
            raise ValueError("TrainConfig.val_ann_file / val_image_root are not set")
        self.cfg = cfg
        self.dataset: Optional[Dataset] = None

    def prepare(self) -> None:
        """Load and check the validation annotations (and detections) now, so a bad file stops the run before any
        training instead of after the first epochs."""
        from .data import AnnotationError, TopDownDataset
        cfg = self.cfg
        if self.dataset is None:
            try:
                self.dataset = TopDownDataset(cfg.val_ann_file, cfg.val_image_root,
                                              get_config(cfg.variant).num_keypoints, train=False,
                                              detections=cfg.val_detections_file)
            except AnnotationError as e:
                flag = "--val-detections-file" if cfg.val_detections_file and cfg.val_detections_file in str(e) \
                    else "--val-ann-file"
                raise TrainError(f"{flag}: {e}") from None

    def __call__(self, model: nn.Module, epoch: int) -> Dict[str, float]:
        from .evaluate import evaluate
        cfg = self.cfg
        self.prepare()
        metrics = evaluate(model, self.dataset, batch_size=cfg.batch_size, flip_test=cfg.flip, num_workers=cfg.workers,
                           amp_dtype=AMP_DTYPES[cfg.amp])
        if not get_config(cfg.variant).wholebody:
            return dict(metrics)
        flat = {f"{part}_{k}": v for part, stats in metrics.items() for k, v in stats.items()}
        flat.update(AP=metrics["wholebody"]["AP"], AR=metrics["wholebody"]["AR"])
        return flat


# ----------------------------------------------------------------------------------------------------------------
# The trainer

_UNREAD = object()
_PATH_FLAGS = (("train_ann_file", "--train-ann-file", "file"), ("train_image_root", "--train-image-root", "dir"),
               ("val_ann_file", "--val-ann-file", "file"), ("val_image_root", "--val-image-root", "dir"),
               ("val_detections_file", "--val-detections-file", "file"), ("init_from", "--init-from", "file"))


def check_output_dir(path: str) -> None:
    """The output folder exists as a writable folder or can be created: not a file, not under a file."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise TrainUsageError(f"--output-dir {path} is a file, not a folder; choose another --output-dir")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise TrainUsageError(f"--output-dir {path} cannot be created: {parent} is a file; choose another "
                              f"--output-dir")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TrainUsageError(f"--output-dir {path}: {parent} is not writable; choose another --output-dir")


def check_paths(cfg: TrainConfig, need_train_data: bool = True) -> None:
    """Every input path of ``cfg`` exists (files as files, folders as folders) and the output folder is usable;
    a :class:`TrainUsageError` naming the flag otherwise."""
    if need_train_data and cfg.train_ann_file is None:
        _default_train_dataset(cfg)  # raises the "no training data" error
    for field, flag, kind in _PATH_FLAGS:
        if field.startswith("train_") and not need_train_data:
            continue
        path = getattr(cfg, field)
        if path is None:
            continue
        if kind == "file" and not os.path.isfile(path):
            what = "a folder, not a file" if os.path.isdir(path) else "not found"
            raise TrainUsageError(f"{flag} {path}: {what}")
        if kind == "dir" and not os.path.isdir(path):
            what = "a file, not a folder" if os.path.exists(path) else "not found"
            raise TrainUsageError(f"{flag} {path}: image folder {what}")
    check_output_dir(cfg.output_dir)


def read_resume_state(cfg: TrainConfig, world_size: int = 1) -> Optional[Mapping[str, Any]]:
    """``cfg.output_dir/last.pth`` checked for resuming (None when absent): readable, ours, the same variant, and a
    world size x batch that can continue a half-done epoch. Errors name the file and the flag to change."""
    last_path = os.path.join(cfg.output_dir, "last.pth")
    if not os.path.exists(last_path):
        return None
    if not cfg.resume:
        raise TrainUsageError(f"{last_path} exists and --no-resume was given: leave out --no-resume to continue that "
                              f"run, or move the file away (or choose another --output-dir) to start from scratch")
    try:
        state = read_checkpoint(last_path)
    except CheckpointError as e:
        raise CheckpointError(f"cannot resume: {e}. The file is kept; move it away to start from scratch in this "
                              f"folder, or choose another --output-dir") from None
    if not isinstance(state, Mapping) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"cannot resume: {last_path} is not a gtpt training checkpoint "
                              f"(format {state.get('format') if isinstance(state, Mapping) else None!r}); move it "
                              f"away or choose another --output-dir")
    if state["variant"] != cfg.variant:
        raise CheckpointError(f"cannot resume: {last_path} is a {state['variant']} run, this config trains "
                              f"{cfg.variant}; use --variant {state['variant']} (or leave --variant out) to continue "
                              f"it, or choose another --output-dir")
    if state["step_in_epoch"] > 0 and (state["world_size"], state["config"]["batch_size"]) != \
            (world_size, cfg.batch_size):
        raise CheckpointError(
            f"cannot resume: {last_path} stopped inside epoch {state['epoch'] + 1} with world size "
            f"{state['world_size']} x batch {state['config']['batch_size']}; the epoch's remaining samples are "
            f"only defined for that layout (now {world_size} x {cfg.batch_size}): resume with "
            f"--batch-size {state['config']['batch_size']} on {state['world_size']} process(es)")
    return state


class _Trainer:
    """One process's run: model, EMA, optimizer, scheduler, scaler, loader and counters; :meth:`run` trains."""

    def __init__(self, cfg: TrainConfig, ctx: _Dist, device: torch.device, dataset: Dataset,
                 val_fn: Optional[ValFn], resume_state: Any = _UNREAD, resume_command: Optional[str] = None):
        self.cfg, self.ctx, self.device, self.val_fn = cfg, ctx, device, val_fn
        self._given_resume_state = resume_state
        self.resume_command = resume_command
        self.bar: Any = None
        self._run_start_step, self._run_start_time = 0, time.perf_counter()
        self.is_main = ctx.rank == 0
        self.out_dir = cfg.output_dir
        self.last_path = os.path.join(self.out_dir, "last.pth")
        self.final_path = os.path.join(self.out_dir, "model_final.pth")
        self.best_path = os.path.join(self.out_dir, "best.pth")
        self.log_path = os.path.join(self.out_dir, "log.jsonl")
        if self.is_main:
            os.makedirs(self.out_dir, exist_ok=True)

        # The same initial weights on every rank and for any world size (DDP would broadcast rank 0's anyway, but the
        # EMA copy is taken from the local model); data-side randomness then differs per rank.
        _seed_everything(cfg.seed)
        self.model = build_model(cfg.variant, backend=cfg.backend)  # the official from-scratch init
        if cfg.joint_token_std is not None:
            init_joint_tokens(self.model, cfg.joint_token_std)  # same seeded stream: every rank alike
        _seed_everything(cfg.seed + ctx.rank)
        self.dataset = dataset
        self.sampler = _EpochSampler(dataset, ctx.world_size, ctx.rank, cfg.seed)
        self.loader_generator = torch.Generator()
        self.loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=self.sampler, num_workers=cfg.workers,
                                 pin_memory=device.type == "cuda", drop_last=False, generator=self.loader_generator,
                                 worker_init_fn=_seed_worker if cfg.workers > 0 else None)
        self.steps_per_epoch = math.ceil(len(self.sampler.inner) / cfg.batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError("the training dataset is empty")

        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.history: List[Dict[str, Any]] = []
        self.best: Optional[Dict[str, Any]] = None
        self.resumed_from: Optional[str] = None
        self.last_loss: Optional[Tensor] = None  # [total, unpruned, pruned, g2l] of the latest step
        self.init_report: Optional[Dict[str, Any]] = None
        resume_state = self._read_resume_state()
        if resume_state is None and cfg.init_from is not None:
            self.init_report = init_from_checkpoint(self.model, cfg.init_from)
        self.model.to(device)
        self.ema = ModelEMA(self.model, cfg.ema_momentum, cfg.epochs * self.steps_per_epoch,
                            ramp=cfg.ema_schedule == "cosine")
        self.optimizer = make_optimizer(self.model, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
        self.criterion = GlobalPerceivedLoss()
        if resume_state is not None:
            self._restore(resume_state)
        # Both passes use every trainable parameter (checked in tests/test_train.py for body and WholeBody), so DDP
        # needs no unused-parameter search. Buffers (BN stats) are broadcast from rank 0 at every forward.
        self.runner: nn.Module = self.model
        if ctx.world_size > 1:
            device_ids = [device.index] if device.type == "cuda" else None
            self.runner = DistributedDataParallel(self.model, device_ids=device_ids, find_unused_parameters=False)

    # -- resume -------------------------------------------------------------------------------------------------
    def _read_resume_state(self) -> Optional[Mapping[str, Any]]:
        if self._given_resume_state is not _UNREAD:
            return self._given_resume_state
        return read_resume_state(self.cfg, self.ctx.world_size)

    def _restore(self, state: Mapping[str, Any]) -> None:
        sd = state["state_dict"]
        self.model.load_state_dict(select_ema(sd, use_ema=False), strict=True)
        self.ema.load_state_dict(select_ema(sd, use_ema=True))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch, self.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        self.history = list(state["metrics"])
        self.best = state["best"]
        if self.is_main:
            _set_rng_state(state["rng"], self.device)
        else:  # only rank 0's states are stored: other ranks get fresh, deterministic streams
            _seed_everything((self.cfg.seed + self.ctx.rank) * 1_000_003 + self.global_step)
        self.resumed_from = self.last_path
        changed = {k: (v, getattr(self.cfg, k)) for k, v in state["config"].items()
                   if k not in ("resume", "max_steps") and v != getattr(self.cfg, k)}
        self._log({"event": "resume", "checkpoint": self.last_path, "epoch": self.epoch,
                   "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                   "changed_config": {k: list(v) for k, v in changed.items()}},
                  f"resumed {self.last_path}: {self._position()}"
                  + (f"; config changed: {changed}" if changed else ""))

    def _position(self) -> str:
        """Where the run stands, 1-based as the step lines count: 'in epoch 2/12 after step 40/125 (global step
        165)', or 'after epoch 3/12 (global step 375)' between epochs."""
        if self.step_in_epoch:
            where = (f"in epoch {self.epoch + 1}/{self.cfg.epochs} after step {self.step_in_epoch}/"
                     f"{self.steps_per_epoch}")
        else:
            where = f"after epoch {self.epoch}/{self.cfg.epochs}"
        return f"{where} (global step {self.global_step})"

    # -- checkpoints and logs -----------------------------------------------------------------------------------
    def _state(self) -> Dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "variant": self.cfg.variant,
                "state_dict": official_state_dict(self.model, self.ema),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step, "steps_per_epoch": self.steps_per_epoch,
                "world_size": self.ctx.world_size, "config": self.cfg.to_dict(), "rng": _rng_state(self.device),
                "metrics": self.history, "best": self.best}

    def _save_last(self) -> None:
        if self.is_main:
            save_checkpoint(self._state(), self.last_path)

    def _log(self, record: Dict[str, Any], line: Optional[str] = None) -> None:
        if not self.is_main:
            return
        if line is not None:
            text = f"[{self.cfg.variant}] {line}"
            if self.bar is not None:
                self.bar.write(text)   # above the progress bar, which then redraws
            else:
                print(text, flush=True)
        with open(self.log_path, "a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    # -- validation ---------------------------------------------------------------------------------------------
    def _validate(self, epoch: int) -> None:
        """val_fn on the EMA model (rank 0; the other ranks wait), logged, kept in the history, best.pth on a new
        best ``best_metric``."""
        if self.val_fn is None:
            return
        if self.is_main:
            raw = self.val_fn(self.ema.module, epoch)
            if not isinstance(raw, Mapping) or not all(isinstance(v, (int, float)) for v in raw.values()):
                raise TypeError(f"val_fn must return a mapping of metric names to numbers, got {raw!r}")
            metrics = {str(k): float(v) for k, v in raw.items()}
            entry = {"epoch": epoch, "global_step": self.global_step, **metrics}
            self.history.append(entry)
            key = self.cfg.best_metric
            is_best = key in metrics and (self.best is None or metrics[key] > self.best["value"])
            if is_best:
                self.best = {"metric": key, "value": metrics[key], "epoch": epoch, "global_step": self.global_step}
                save_checkpoint(official_state_dict(self.model, self.ema), self.best_path)
            mid = (f" (stopped after step {self.step_in_epoch}/{self.steps_per_epoch})"
                   if epoch == self.epoch and 0 < self.step_in_epoch < self.steps_per_epoch else "")
            self._log({"event": "val", **entry, "best": is_best},
                      f"val epoch {epoch + 1}/{self.cfg.epochs}{mid}, EMA weights: "
                      + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + (" (best)" if is_best else ""))
        if self.ctx.world_size > 1:
            dist.barrier()

    # -- training -----------------------------------------------------------------------------------------------
    def _train_epoch(self) -> bool:
        """Train the rest of ``self.epoch``; returns False when max_steps stopped it early."""
        cfg, device = self.cfg, self.device
        self.runner.train()
        with _hold_stop_signals():  # advance_scheduler is idempotent per epoch: a half-done step would lose a decay
            advance_scheduler(self.scheduler, self.epoch)
        self.sampler.set_epoch(self.epoch, skip=self.step_in_epoch * cfg.batch_size)
        self.loader_generator.manual_seed(hash((cfg.seed, self.ctx.rank, self.epoch)) & 0x7FFF_FFFF_FFFF_FFFF)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        amp_dtype = AMP_DTYPES[cfg.amp]
        window = {"steps": 0, "images": 0, "t0": time.perf_counter()}
        sums: Optional[Tensor] = None
        for batch in self.loader:
            images = batch["image"].to(device, non_blocking=True)
            targets = [batch[k].to(device, non_blocking=True) for k in ("target_x", "target_y", "target_weight")]
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                outputs = self.runner(images)
            loss, parts = self.criterion(outputs, *targets, return_parts=True)  # fp32 whatever the logits' dtype
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if cfg.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            if cfg.warmup_steps and self.global_step <= cfg.warmup_steps:
                # linear warm-up from the epoch's scheduled lr / warmup_steps; set whole each step, so it is a
                # function of (epoch, global step) alone and a resumed run gets the same lr
                base = cfg.lr * cfg.lr_gamma ** sum(m <= self.epoch + 1 for m in cfg.lr_milestones)
                for group in self.optimizer.param_groups:
                    group["lr"] = base * min(1.0, (self.global_step + 1) / cfg.warmup_steps)
            with _hold_stop_signals():
                self.scaler.step(self.optimizer)
                self.scaler.update()
                momentum = self.ema.update(self.model, self.global_step)
                self.global_step += 1
                self.step_in_epoch += 1
            step_vals = torch.stack([loss.detach(), parts["unpruned"], parts["pruned"], parts["g2l"]])
            sums = step_vals if sums is None else sums + step_vals
            if self.bar is not None:
                self.bar.update(1)
            window["steps"] += 1
            window["images"] += images.size(0) * self.ctx.world_size
            self.last_loss = step_vals
            if self.step_in_epoch % cfg.log_every == 0 or self.step_in_epoch == self.steps_per_epoch:
                self._log_window(sums, window, momentum)
                sums = None
                window = {"steps": 0, "images": 0, "t0": time.perf_counter()}
            if cfg.max_steps is not None and self.global_step >= cfg.max_steps:
                if sums is not None:
                    self._log_window(sums, window, momentum)
                return False
        return True

    def _log_window(self, sums: Tensor, window: Dict[str, Any], momentum: float) -> None:
        """Mean loss parts over the steps since the last log line, averaged over the ranks (one all-reduce and one
        device sync), so every rank sees the same values and a non-finite loss stops all of them together (a rank
        raising alone would leave the others waiting in the next all-reduce)."""
        if self.ctx.world_size > 1:
            sums = sums.clone()
            dist.all_reduce(sums)
            sums /= self.ctx.world_size
        mean = (sums / window["steps"]).tolist()
        if not all(math.isfinite(v) for v in mean):
            raise FloatingPointError(f"non-finite loss {mean[0]} in epoch {self.epoch} before global step "
                                     f"{self.global_step}; {self.last_path} holds the last good epoch")
        if not self.is_main:
            return
        elapsed = time.perf_counter() - window["t0"]
        lr = self.optimizer.param_groups[0]["lr"]
        rate = window["images"] / elapsed if elapsed > 0 else float("nan")
        rec = {"event": "train", "epoch": self.epoch, "step": self.step_in_epoch, "global_step": self.global_step,
               "loss": mean[0], "unpruned": mean[1], "pruned": mean[2], "g2l": mean[3], "lr": lr,
               "ema_momentum": momentum, "images_per_s": rate}
        n = window["steps"]
        if self.bar is not None:  # the bar shows progress and ETA; the line only goes to log.jsonl
            self.bar.set_postfix_str(f"mean loss {mean[0]:.5f} ({n} steps) lr {lr:.1e}")
            self._log(rec)
            return
        self._log(rec, f"epoch {self.epoch + 1}/{self.cfg.epochs} step {self.step_in_epoch}/{self.steps_per_epoch} "
                       f"(global {self.global_step}): mean loss of the last {n} step{'s' * (n > 1)} {mean[0]:.6f} "
                       f"(unpruned {mean[1]:.6f} pruned {mean[2]:.6f} g2l {mean[3]:.6f}) lr {lr:.2e} "
                       f"ema_m {momentum:.6f} {rate:.1f} img/s{self._eta()}")

    def _steps_planned(self) -> int:
        """Global step at which this run ends: epochs x steps, or --max-steps when that comes first."""
        total = self.cfg.epochs * self.steps_per_epoch
        return min(total, self.cfg.max_steps) if self.cfg.max_steps is not None else total

    def _eta(self) -> str:
        done = self.global_step - self._run_start_step
        left = self._steps_planned() - self.global_step
        if done <= 0 or left <= 0:
            return ""
        per_step = (time.perf_counter() - self._run_start_time) / done
        return f", ETA {_duration(per_step * left)}"

    def _finished(self) -> Optional[str]:
        """Why there is nothing left to train (a finished run started again), else None."""
        cfg = self.cfg
        if self.epoch >= cfg.epochs:
            return (f"{self.out_dir} holds a finished run: {self.epoch}/{cfg.epochs} epochs (global step "
                    f"{self.global_step}); nothing to train. To train longer give a larger --epochs; to start over "
                    f"choose another --output-dir")
        if cfg.max_steps is not None and self.global_step >= cfg.max_steps:
            return (f"{self.out_dir} already stopped at --max-steps {cfg.max_steps} ({self._position()}); nothing "
                    f"to train. Raise --max-steps or leave it out to continue")
        return None

    def run(self) -> Dict[str, Any]:
        cfg = self.cfg
        start_step = self.global_step
        self._run_start_step, self._run_start_time = start_step, time.perf_counter()
        finished = self._finished()
        if finished is not None:
            self._log({"event": "finished", "epoch": self.epoch, "global_step": self.global_step}, finished)
            if self.is_main and not os.path.isfile(self.final_path):  # stopped between last.pth and model_final
                save_checkpoint(official_state_dict(self.model, self.ema), self.final_path)
            return self._summary(start_step)
        total = cfg.epochs * self.steps_per_epoch
        plan = (f"{self._steps_planned()} steps (--max-steps {cfg.max_steps} of {cfg.epochs} epochs x "
                f"{self.steps_per_epoch} steps)" if self._steps_planned() < total else
                f"{cfg.epochs} epochs x {self.steps_per_epoch} steps = {total} steps")
        if self.resumed_from is None:
            self._log({"event": "start", "config": cfg.to_dict(), "world_size": self.ctx.world_size,
                       "device": str(self.device), "steps_per_epoch": self.steps_per_epoch, "init": self.init_report},
                      f"training {plan}, batch {cfg.batch_size} x {self.ctx.world_size} process(es) on {self.device}"
                      + (f"; init from {cfg.init_from} ({self.init_report['source']}), new: {self.init_report['new']}"
                         if self.init_report else ""))
        elif self.is_main:
            self._log({"event": "plan"}, f"continuing: {self._steps_planned() - self.global_step} of {plan} left")
        validated_at = -1
        self.bar = _progress_bar(self._steps_planned(), self.global_step, cfg.variant) if self.is_main else None
        try:
            while self.epoch < cfg.epochs:
                if cfg.max_steps is not None and self.global_step >= cfg.max_steps:
                    break
                if self.bar is not None:
                    self.bar.set_description(f"epoch {self.epoch + 1}/{cfg.epochs}")
                if not self._train_epoch():
                    self._save_last()
                    break
                if (self.epoch + 1) % cfg.val_every == 0 or self.epoch + 1 == cfg.epochs:
                    self._validate(self.epoch)
                    validated_at = self.global_step
                with _hold_stop_signals():  # (epoch + 1, step 0) together: (epoch + 1, last step) would skip an epoch
                    self.epoch += 1
                    self.step_in_epoch = 0
                self._save_last()
            if self.val_fn is not None and validated_at != self.global_step and self.global_step > start_step:
                self._validate(self.epoch if self.step_in_epoch else self.epoch - 1)
                self._save_last()
        except KeyboardInterrupt:
            self._save_last()
            again = (f"run again: {self.resume_command}" if self.resume_command else
                     "run the same torchrun command again" if self.ctx.world_size > 1 else
                     "call train() again with the same TrainConfig")
            self._close_bar()
            self._log({"event": "interrupt", "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                       "global_step": self.global_step},
                      f"interrupted {self._position()}: saved {self.last_path}. To continue, {again}")
            raise
        finally:
            self._close_bar()
        if self.is_main:
            save_checkpoint(official_state_dict(self.model, self.ema), self.final_path)
        summary = self._summary(start_step)
        best = (f", best {self.best['metric']} {self.best['value']:.4f} (epoch {self.best['epoch'] + 1})"
                if self.best else "")
        self._log({"event": "end", **{k: v for k, v in summary.items() if k not in ("metrics", "model", "ema_model")}},
                  f"done: {self.global_step} steps ({summary['steps_run']} in this run, "
                  f"{_duration(time.perf_counter() - self._run_start_time)}), loss of the last step "
                  f"{summary['final_loss']:.6f}{best}; weights {self.final_path}")
        return summary

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _summary(self, start_step: int) -> Dict[str, Any]:
        cfg = self.cfg
        final = self.last_loss.tolist() if self.last_loss is not None else None
        return {"variant": cfg.variant, "steps": self.global_step, "steps_run": self.global_step - start_step,
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "world_size": self.ctx.world_size,
                "final_loss": final[0] if final else None,
                "final_loss_parts": dict(zip(GlobalPerceivedLoss.PARTS, final[1:])) if final else None,
                "last_checkpoint": self.last_path, "final_checkpoint": self.final_path,
                "best_checkpoint": self.best_path if self.best is not None else None, "best": self.best,
                "metrics": self.history, "resumed_from": self.resumed_from, "init": self.init_report,
                "model": self.model, "ema_model": self.ema.module}


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


def _progress_bar(total: int, initial: int, variant: str) -> Any:
    """A tqdm bar over the run's global steps (ETA included) when stderr is a terminal; None otherwise (logs, CI,
    pipes get the periodic step lines instead)."""
    stream = sys.stderr
    if not (hasattr(stream, "isatty") and stream.isatty()) or os.environ.get("GTPT_NO_PROGRESS"):
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # declared in setup.py; a bare environment still trains, with log lines
        return None
    return tqdm(total=total, initial=initial, file=stream, unit="step", dynamic_ncols=True, leave=True,
                desc=variant, smoothing=0.1)


def train(cfg: TrainConfig, train_dataset: Optional[Dataset] = None, val_fn: Optional[ValFn] = None,
          device: Optional[Union[str, torch.device]] = None, resume_command: Optional[str] = None) -> Dict[str, Any]:
    """Train ``cfg.variant``; returns a summary: steps, final loss and its parts, checkpoint paths, metrics, and the
    trained ``model`` (student, unwrapped) and ``ema_model``.

    ``train_dataset`` yields dicts with ``image`` (3, 256, 192), ``target_x`` (K, 384), ``target_y`` (K, 512),
    ``target_weight`` (K,) (default: ``gtpt.data.TopDownDataset`` on the config's train paths); its ``set_epoch`` is
    called every epoch when present. ``val_fn(ema_model, epoch)`` returns a dict of metrics (default:
    :class:`CocoValidator` when the config has validation paths, else no validation); it runs on rank 0 every
    ``val_every`` epochs (after 0-based epochs 4, 9, ... as the official ``epoch % 5 == 4``) and at the end.
    Under ``torchrun`` (WORLD_SIZE > 1) it runs DDP, one process per device. SIGINT/SIGTERM save ``last.pth`` and
    re-raise KeyboardInterrupt; calling ``train`` again with the same config continues bit-for-bit (CPU) provided the
    dataset's augmentation depends only on (epoch, index). ``resume_command`` is the command line the interrupt
    message tells the user to run again (``gtpt train`` passes its own).

    Checked before any training, each a one-line :class:`TrainError` / :class:`CheckpointError` naming the
    command-line flag or file: the data files exist and load, the output folder can be created, and an existing
    ``last.pth`` is readable, ours and of this variant.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    check_paths(cfg, need_train_data=train_dataset is None)
    if val_fn is None and cfg.val_ann_file is not None:
        val_fn = CocoValidator(cfg)
    ctx, device = _setup_distributed(device)
    try:
        with profiler.interrupt_on_stop_signals(), _record_stop_signals():
            state = read_resume_state(cfg, ctx.world_size)
            dataset = train_dataset if train_dataset is not None else _default_train_dataset(cfg)
            if ctx.rank == 0 and hasattr(val_fn, "prepare"):
                val_fn.prepare()
            return _Trainer(cfg, ctx, device, dataset, val_fn, resume_state=state,
                            resume_command=resume_command).run()
    finally:
        if ctx.owns_group:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# Command line: python -m gtpt.train ... (or torchrun --nproc_per_node=N -m gtpt.train ...)

# `gtpt train` without data options trains on a generated dataset (gtpt.synth) with these defaults instead of the
# official COCO schedule; every one of them can still be given on the command line. Chosen for a 2-core CPU: see
# README "Training without COCO".
SYNTH_IMAGES = 264                 # 216 train + 48 val (SYNTH_VAL_FRACTION): an epoch of 27 steps, validated after each
SYNTH_VAL_FRACTION = 2 / 11
SYNTH_DIFFICULTY = "easy"          # gtpt.synth.DIFFICULTIES: one whole figure per image, moderate pose, plain backgrounds
SYNTH_DEFAULTS: Dict[str, Any] = {"epochs": 10, "batch_size": 8, "lr": 3e-3, "lr_milestones": (9,),
                                  "warmup_steps": 20, "ema_momentum": 0.9, "ema_schedule": "constant",
                                  "val_every": 1, "log_every": 10, "flip": False, "augment": "none",
                                  "joint_token_std": 1.0}
_DATA_FIELDS = ("train_ann_file", "train_image_root", "val_ann_file", "val_image_root", "val_detections_file")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}


_int_at_least = int_at_least  # gtpt.cli_options (torch-free; shared with the other commands)


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return v


def build_arg_parser(prog: str = "python -m gtpt.train") -> argparse.ArgumentParser:
    """One flag per TrainConfig field (``--lr-milestones 200 260``, ``--no-resume``), plus ``--device``. Options whose
    default differs on the synthetic dataset default to None here and are filled in by :func:`main`."""
    from .config import list_variants

    class Parser(argparse.ArgumentParser):
        def error(self, message: str):  # one line, exit 2 (as the other gtpt commands)
            self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")

    parser = Parser(prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
                    description="Train GTPT (two passes with the global-perceived loss, EMA, AMP; DDP when launched "
                                "with torchrun --nproc_per_node=N -m gtpt.train).\n\n"
                                "Without data options it generates a synthetic dataset of drawn figures (gtpt synth) "
                                "into the cache\n($GTPT_CACHE, else ~/.cache/gtpt) and trains and validates on it "
                                "with defaults sized for a CPU;\nwith --train-ann-file/--train-image-root it trains "
                                "on your COCO(-WholeBody) data with the official schedule.\nThe same command "
                                "resumes an interrupted run from OUTPUT_DIR/last.pth.",
                    epilog="example: gtpt train --variant gtpt-t --output-dir runs/synth   (synthetic data, ~12 min "
                           "on a 2-core CPU)")

    def syn(name: str) -> str:
        official, synth = _DEFAULTS[name], SYNTH_DEFAULTS[name]
        show = (lambda v: " ".join(map(str, v)) if isinstance(v, tuple) else v)
        return f"default {show(official)}; {show(synth)} on the synthetic dataset"

    g = parser.add_argument_group("model and output")
    g.add_argument("--variant", default=None, help="model variant: " + ", ".join(list_variants()) + " (default: the "
                   "variant of OUTPUT_DIR/last.pth or --init-from when there is one, else gtpt-t)")
    g.add_argument("--output-dir", required=True, help="run folder: last.pth (resume), model_final.pth, best.pth, "
                                                       "log.jsonl")
    g.add_argument("--init-from", default=None, metavar="CKPT", help="start from this checkpoint's EMA weights "
                   "(curriculum: a body run's model_final.pth for a -wholebody variant)")
    g.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from OUTPUT_DIR/last.pth when it exists (default); --no-resume refuses to touch "
                        "an existing run")
    d = parser.add_argument_group("data (leave all out to train on the synthetic dataset)")
    d.add_argument("--train-ann-file", default=None, metavar="JSON",
                   help="COCO person_keypoints / COCO-WholeBody annotation file to train on")
    d.add_argument("--train-image-root", default=None, metavar="DIR", help="folder holding its images")
    d.add_argument("--val-ann-file", default=None, metavar="JSON",
                   help="annotation file to validate on (COCO AP of the EMA model; none: no validation)")
    d.add_argument("--val-image-root", default=None, metavar="DIR", help="folder holding its images")
    d.add_argument("--val-detections-file", default=None, metavar="JSON",
                   help="person detections (COCO results) for validation boxes (default: GT boxes)")
    d.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="flip augmentation in training and flip test in validation (default on; off on the "
                        "synthetic dataset, whose left and right limbs differ in colour)")
    d.add_argument("--augment", choices=tuple(AUGMENTATIONS), default=None,
                   help="augmentation strength: official (scale 0.35, rotation 45, half body 0.3), light "
                        f"(0.2, 15, 0) or none ({syn('augment')})")
    o = parser.add_argument_group("schedule")
    o.add_argument("--epochs", type=_int_at_least(1), default=None, help=syn("epochs"))
    o.add_argument("--batch-size", type=_int_at_least(1), default=None, help=f"per process ({syn('batch_size')})")
    o.add_argument("--lr", type=_positive_float, default=None, help=f"Adam learning rate ({syn('lr')})")
    o.add_argument("--lr-milestones", type=_int_at_least(1), nargs="+", default=None, metavar="EPOCH",
                   help=f"epochs where the lr is multiplied by --lr-gamma ({syn('lr_milestones')})")
    o.add_argument("--lr-gamma", type=_positive_float, default=_DEFAULTS["lr_gamma"],
                   help=f"lr decay factor (default {_DEFAULTS['lr_gamma']})")
    o.add_argument("--ema-momentum", type=float, default=None,
                   help=f"starting EMA momentum, rising to 1 on a cosine ({syn('ema_momentum')})")
    o.add_argument("--ema-schedule", choices=("cosine", "constant"), default=None,
                   help=f"EMA momentum: cosine rise to 1 over the run, or constant ({syn('ema_schedule')})")
    o.add_argument("--warmup-steps", type=_int_at_least(0), default=None,
                   help=f"linear lr warm-up over the first N steps ({syn('warmup_steps')})")
    o.add_argument("--max-steps", type=_int_at_least(1), default=None,
                   help="stop after this many optimizer steps in all (smoke runs; default: no limit)")
    o.add_argument("--grad-clip", type=_positive_float, default=None,
                   help="max gradient norm (default: none, as the official recipe)")
    o.add_argument("--joint-token-std", type=_positive_float, default=None, metavar="STD",
                   help="initialise the keypoint/part tokens of a from-scratch run with this std (default: the "
                        f"official trunc-normal .02; {SYNTH_DEFAULTS['joint_token_std']} on the synthetic dataset)")
    o.add_argument("--seed", type=_int_at_least(0), default=_DEFAULTS["seed"],
                   help=f"seed of weights and data order (default {_DEFAULTS['seed']})")
    o.add_argument("--val-every", type=_int_at_least(1), default=None,
                   help=f"validate every N epochs and at the end ({syn('val_every')})")
    o.add_argument("--best-metric", default=_DEFAULTS["best_metric"],
                   help=f"validation metric that selects best.pth (default {_DEFAULTS['best_metric']})")
    r = parser.add_argument_group("runtime")
    r.add_argument("--workers", type=_int_at_least(0), default=None,
                   help=f"data loader processes (default on this machine: {default_workers()}, i.e. usable "
                        f"cores - 1, at most 4)")
    r.add_argument("--amp", choices=tuple(AMP_DTYPES), default=_DEFAULTS["amp"],
                   help="autocast dtype (default none; fp16 adds a GradScaler)")
    r.add_argument("--backend", choices=BACKENDS, default=_DEFAULTS["backend"],
                   help="gtpt_kernels backend (default auto: Triton on CUDA, the PyTorch reference on CPU)")
    r.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda, cuda:LOCAL_RANK under "
                                                  "torchrun, if present, else cpu)")
    r.add_argument("--log-every", type=_int_at_least(1), default=None,
                   help=f"a log line every N steps and at each epoch end ({syn('log_every')}); on a terminal a "
                        f"progress bar with ETA shows instead")
    return parser


def _checkpoint_variant(path: str) -> Optional[str]:
    """The variant a checkpoint was trained as: ours record it, official ones are told from tensor shapes."""
    from .checkpoint import _guess_variant
    state = read_checkpoint(path)
    if isinstance(state, Mapping) and isinstance(state.get("variant"), str):
        return state["variant"]
    try:
        guess = _guess_variant(select_ema(unwrap_state_dict(state), use_ema=True))
    except CheckpointError:
        return None
    return None if "?" in guess else guess


def _resolve_cli(args: Dict[str, Any], prog: str) -> Tuple[Dict[str, Any], List[str]]:
    """TrainConfig keyword arguments from the parsed flags: the variant (from a checkpoint when not given), the data
    (the cached synthetic dataset when no data option is given) and the defaults that depend on the data. Checks
    the output folder and an existing last.pth before generating anything. Returns (kwargs, notes to print)."""
    notes: List[str] = []
    check_output_dir(args["output_dir"])
    last = os.path.join(args["output_dir"], "last.pth")
    synthetic = all(args[k] is None for k in _DATA_FIELDS)
    if not synthetic:
        for need, flag, what in (("train_ann_file", "--train-ann-file", "COCO keypoint annotation JSON"),
                                 ("train_image_root", "--train-image-root", "its image folder")):
            if args[need] is None:
                given = " ".join("--" + k.replace("_", "-") for k in _DATA_FIELDS if args[k] is not None)
                raise TrainUsageError(f"{flag} ({what}) is required with {given}; or leave every data option out "
                                      f"to train on the synthetic dataset")
        if (args["val_ann_file"] is None) != (args["val_image_root"] is None):
            raise TrainUsageError("give --val-ann-file and --val-image-root together")
        if args["val_detections_file"] is not None and args["val_ann_file"] is None:
            raise TrainUsageError("--val-detections-file needs --val-ann-file and --val-image-root")
    if args["variant"] is not None:
        args["variant"] = get_config(args["variant"]).name  # raises on an unknown name
    run_variant = None
    if os.path.exists(last):  # the run folder's state decides before any data is generated or read
        if not args["resume"]:
            raise TrainUsageError(f"{last} exists and --no-resume was given: leave out --no-resume to continue that "
                                  f"run, or move the file away (or choose another --output-dir) to start from "
                                  f"scratch")
        try:
            run_variant = _checkpoint_variant(last)
        except CheckpointError as e:
            raise CheckpointError(f"cannot resume: {e}. The file is kept; move it away to start from scratch in "
                                  f"this folder, or choose another --output-dir") from None
        if args["variant"] is not None and run_variant is not None and run_variant != args["variant"]:
            raise CheckpointError(f"cannot resume: {last} is a {run_variant} run, not {args['variant']}; use "
                                  f"--variant {run_variant} (or leave --variant out) to continue it, or choose "
                                  f"another --output-dir")
    if args["variant"] is None:
        source = None
        if run_variant is not None:
            args["variant"], source = run_variant, last
        elif args["init_from"] is not None:
            if not os.path.isfile(args["init_from"]):
                raise TrainUsageError(f"--init-from {args['init_from']}: not found")
            try:
                args["variant"], source = _checkpoint_variant(args["init_from"]), args["init_from"]
            except CheckpointError as e:
                raise CheckpointError(f"--init-from: {e}") from None
            if args["variant"] is None:
                raise TrainUsageError(f"cannot tell the variant of --init-from {args['init_from']}; give --variant")
        if args["variant"] is None:
            args["variant"] = "gtpt-t"
            notes.append("variant gtpt-t (the default; choose with --variant)")
        else:
            notes.append(f"variant {args['variant']} (from {source})")
    defaults = SYNTH_DEFAULTS if synthetic else _DEFAULTS
    for k in SYNTH_DEFAULTS:
        if args[k] is None:
            args[k] = defaults[k]
    if args["workers"] is None:
        args["workers"] = default_workers()
    if synthetic:
        from .synth import SynthError, dataset_paths, ensure_cached
        wholebody = get_config(args["variant"]).wholebody  # raises on an unknown variant (caught by main)
        t0 = time.perf_counter()
        try:
            root, made = ensure_cached(SYNTH_IMAGES, wholebody=wholebody, seed=0, difficulty=SYNTH_DIFFICULTY,
                                       val_fraction=SYNTH_VAL_FRACTION,
                                       progress=lambda m: print(f"{prog}: generating the synthetic dataset: {m}",
                                                                file=sys.stderr, flush=True))
        except SynthError as e:
            raise TrainError(str(e)) from None
        paths = dataset_paths(root, wholebody)
        args.update({k: paths[k] for k in ("train_ann_file", "train_image_root", "val_ann_file", "val_image_root")})
        how = f"generated in {time.perf_counter() - t0:.0f} s" if made else "found in the cache"
        notes.append(f"no data options: training on the synthetic dataset {root} ({how}; {SYNTH_IMAGES} images of "
                     f"drawn figures, {len(os.listdir(paths['val_image_root']))} of them held out for validation). "
                     f"Its defaults: " + " ".join(f"--{k.replace('_', '-')} "
                                                  f"{' '.join(map(str, v)) if isinstance(v, tuple) else v}"
                                                  for k, v in SYNTH_DEFAULTS.items()
                                                  if not isinstance(v, bool)) + " --no-flip. "
                     f"Give --train-ann-file and --train-image-root to train on your own data")
    args["lr_milestones"] = tuple(args["lr_milestones"])
    return args, notes


def _flags_in(message: str) -> str:
    """A TrainConfig message with its field names written as the command-line flags."""
    import re
    for f in sorted(dataclasses.fields(TrainConfig), key=lambda f: -len(f.name)):
        message = re.sub(rf"(?<![-\w]){f.name}(?!\w)", "--" + f.name.replace("_", "-"), message)
    return message.replace("TrainConfig: ", "")


def _resume_command(prog: str, argv: Sequence[str]) -> str:
    import shlex
    return " ".join([prog] + [shlex.quote(a) for a in argv if a != "--no-resume"])


def main(argv: Optional[List[str]] = None, prog: str = "python -m gtpt.train") -> int:
    """The command line. Errors are one line on stderr naming the flag or file: exit 2 for bad arguments, 1 for data,
    checkpoint and file-system problems, 130 after an interrupt (last.pth saved; the same command resumes)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_arg_parser(prog)
    args = vars(parser.parse_args(argv))
    device = args.pop("device")
    try:
        try:
            kwargs, notes = _resolve_cli(args, prog)
            cfg = TrainConfig(**kwargs)
        except ValueError as e:
            if isinstance(e, CheckpointError):
                raise
            raise TrainUsageError(_flags_in(str(e))) from None
        for note in notes:
            print(f"[{cfg.variant}] {note}", flush=True)
        train(cfg, device=device, resume_command=_resume_command(prog, argv))
    except KeyboardInterrupt:
        if _last_stop_signal == [signal.SIGTERM]:
            # SIGTERM asks the process to end. last.pth is saved: end as this process's own SIGTERM handler says
            # (by default: terminate; a caller that turns SIGTERM into KeyboardInterrupt, such as a time-boxed
            # pytest, gets it back) rather than return into a caller that would carry on past its deadline.
            sys.stdout.flush()
            sys.stderr.flush()
            signal.raise_signal(signal.SIGTERM)
        return 130  # last.pth is saved; run the same command again to resume
    except TrainError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    except CheckpointError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{prog}: error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
