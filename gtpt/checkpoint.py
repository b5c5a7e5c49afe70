"""Official checkpoints in, our checkpoints out.

``load_official_checkpoint`` reads the ``.pth`` files of the official repository (github.com/haonanwang0522/GTPT)
or their state dicts: it prefers the EMA copy (what the official evaluation runs), checks every tensor against
the model before touching it, and loads with ``weights_only=True`` (no arbitrary pickles).
``save_checkpoint`` writes atomically, so an interrupted save never leaves a truncated file behind.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import IO, Any, Dict, Iterator, Mapping, Union

import torch
from torch import Tensor, nn

from .config import VARIANTS

_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "best_state_dict")


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded into the model (corrupt file, other variant, missing or extra tensors)."""


def _numpy_scalar_globals() -> list:
    """What a numpy scalar in a checkpoint needs under ``weights_only`` (the official training script stores the
    validation AP as ``perf``, a numpy float, in its per-epoch ``checkpoint.pth``): the scalar constructor under its
    numpy 1 and numpy 2 module paths, ``numpy.dtype`` and its numeric classes. None of them can run arbitrary
    code."""
    import numpy as np
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    dtype_classes = {type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDG"}  # numpy >= 1.25: one class per dtype
    return [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype,
            *sorted(dtype_classes - {np.dtype}, key=lambda t: t.__name__)]


def read_checkpoint(path: Union[str, os.PathLike]) -> Mapping[str, Any]:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with numpy scalars allowed; any failure is a
    :class:`CheckpointError` naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        allow = torch.serialization.safe_globals(_numpy_scalar_globals())
    except (AttributeError, TypeError):  # a torch without safe_globals or its (callable, name) form
        allow = contextlib.nullcontext()
    try:
        with allow:
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, or a pickle needing arbitrary code
        raise CheckpointError(f"could not read checkpoint {path}: corrupt, truncated or not a PyTorch state dict "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def unwrap_state_dict(obj: Mapping[str, Any]) -> Dict[str, Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    for key in _CONTAINER_KEYS:
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}
    bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint entries that are not tensors: {bad[:5]}{' ...' if len(bad) > 5 else ''}")
    return sd


def select_ema(sd: Mapping[str, Tensor], use_ema: bool = True) -> Dict[str, Tensor]:
    """The EMA copy (``ema_features.*``, ``ema_mlp_head_*``) renamed to student names when present and wanted,
    else the student copy."""
    has_ema = any(k.startswith("ema_") for k in sd)
    if use_ema and has_ema:
        return {k[len("ema_"):]: v for k, v in sd.items() if k.startswith("ema_")}
    return {k: v for k, v in sd.items() if not k.startswith("ema_")}


def _official_group_mask(mask: Tensor) -> bool:
    """The official ``GroupAttention.mask`` buffer: True (masked) on the padding query row and key column 0."""
    if mask.dtype != torch.bool or mask.dim() != 5:
        return False
    expect = torch.zeros(mask.shape, dtype=torch.bool, device=mask.device)  # a state dict may live on a GPU
    expect[:, :, 0, 0, :] = True
    expect[..., 0] = True
    return torch.equal(mask, expect)


def _guess_variant(sd: Mapping[str, Tensor]) -> str:
    dim = sd.get("features.human_token", torch.empty(0, 0, 0)).shape[-1]
    wb = "features.fine_keypoint_token" in sd
    b = any(k.startswith("features.stem.down_layer") for k in sd)
    size = "b" if b else {128: "t", 192: "s"}.get(dim, "?")
    return f"gtpt-{size}{'-wholebody' if wb else ''}"


def read_model_state_dict(checkpoint: Union[str, os.PathLike, Mapping[str, Any]], use_ema: bool = True
                          ) -> Dict[str, Tensor]:
    """The model tensors of a checkpoint (path or loaded object, official layout or ours), safely read, container
    keys and ``module.`` prefixes stripped, the EMA copy chosen per :func:`select_ema`.

    The fixed attention-mask buffers of the official GroupAttention are not tensors of our model: their semantics
    are built into the op (``pad_token=True``). They are checked to be the official pattern, then dropped."""
    raw = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    sd = select_ema(unwrap_state_dict(raw), use_ema)
    for k in [k for k in sd if k.endswith(".fn.fn.mask")]:
        if not _official_group_mask(sd[k]):
            raise CheckpointError(f"{k}: not the official GroupAttention mask (shape {tuple(sd[k].shape)})")
        del sd[k]
    return sd


def load_official_checkpoint(model: nn.Module, checkpoint: Union[str, os.PathLike, Mapping[str, Any]],
                             use_ema: bool = True) -> nn.Module:
    """Load an official GTPT checkpoint (path or state dict) into ``model``, all or nothing.

    Raises :class:`CheckpointError` listing every missing, unexpected and wrongly shaped tensor at once (and the
    variant the checkpoint looks like), without modifying the model.
    """
    sd = read_model_state_dict(checkpoint, use_ema)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                   for k in set(own) & set(sd) if sd[k].shape != own[k].shape)
    if missing or unexpected or wrong:
        name = getattr(getattr(model, "cfg", None), "name", type(model).__name__)
        lines = [f"checkpoint does not fit {name} (it looks like {_guess_variant(sd)}; variants: "
                 f"{', '.join(VARIANTS)}):"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:12]) + (" ..." if len(items) > 12 else ""))
        raise CheckpointError("\n".join(lines))
    bad_dtype = [k for k in own if own[k].is_floating_point() != sd[k].is_floating_point()]
    if bad_dtype:
        raise CheckpointError(f"tensors with an incompatible dtype: {bad_dtype[:8]}")
    nonfinite = [k for k in own if sd[k].is_floating_point() and not torch.isfinite(sd[k]).all()]
    if nonfinite:
        raise CheckpointError(f"tensors with NaN/Inf values: {nonfinite[:8]}")
    model.load_state_dict(sd, strict=True)
    return model


@contextlib.contextmanager
def atomic_write(path: Union[str, os.PathLike], mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on success fsync it, atomically rename it over ``path``
    and fsync the folder (so the rename itself survives a power loss); on any error remove it. Readers see the old
    file or the new one, never a truncated one. The file gets the permissions a plain ``open`` would give it
    (``0666`` less the umask; ``mkstemp`` alone would leave it ``0600``, unreadable to other users of a shared
    machine)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def _fsync_folder(folder: str) -> None:
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory handles: the file itself is already on disk
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def save_checkpoint(obj: Any, path: Union[str, os.PathLike]) -> None:
    """``torch.save`` through :func:`atomic_write`: an interrupted save never leaves a truncated file behind."""
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)
