"""Backend selection shared by every op in :mod:`gtpt_kernels`.

Three backends:

* ``"reference"`` - the pure-PyTorch ops in :mod:`gtpt_kernels.reference`; the truth the kernels are tested
  against, and what runs on CPU tensors.
* ``"triton"`` - the fused Triton kernels. On CPU tensors they only run under the Triton interpreter
  (``TRITON_INTERPRET=1`` set before triton is imported).
* ``"auto"`` (default) - Triton for CUDA tensors, and for CPU tensors when the interpreter is on; the
  reference otherwise.

The choice is made per call (``backend=`` argument), globally (:func:`set_backend` or the
:func:`use_backend` context manager) or by the ``GTPT_KERNELS_BACKEND`` environment variable, in that order of
precedence.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch
from torch.autograd import forward_ad as _forward_ad

BACKENDS = ("auto", "reference", "triton")
ENV_VAR = "GTPT_KERNELS_BACKEND"

_global_backend: Optional[str] = None


def _check(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid backends: {', '.join(BACKENDS)}")
    return name.lower()


def set_backend(name: Optional[str]) -> None:
    """Set the process-wide default backend (``None`` goes back to the environment variable / ``"auto"``)."""
    global _global_backend
    _global_backend = None if name is None else _check(name)


def get_backend() -> str:
    """The backend a call without ``backend=`` uses: the global setting, else the env var, else ``"auto"``."""
    if _global_backend is not None:
        return _global_backend
    env = os.environ.get(ENV_VAR)
    if env:
        return _check(env)
    return "auto"


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Context manager that sets the global backend and restores the previous one on exit. The setting is
    process-wide (like ``torch.backends`` flags): other threads see it while the block runs."""
    global _global_backend
    previous = _global_backend
    set_backend(name)
    try:
        yield
    finally:
        _global_backend = previous


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


# Triton reads TRITON_INTERPRET when a kernel is defined (@triton.jit), i.e. when gtpt_kernels is imported; what
# the variable says later does not change how the kernels run.
_INTERPRET_AT_IMPORT = _interpret_env()


def interpreter_enabled() -> bool:
    """True when the kernels were built for the Triton interpreter: ``TRITON_INTERPRET=1`` was set when
    :mod:`gtpt_kernels` was imported (setting it afterwards has no effect on kernels already defined)."""
    return _INTERPRET_AT_IMPORT


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton missing (e.g. macOS)
        return False
    return True


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """Turn a requested backend (``None`` = the default) into ``"reference"`` or ``"triton"`` for tensors on
    ``device``. An explicit ``"triton"`` on a device it cannot run on is an error, not a silent fallback."""
    name = get_backend() if backend is None else _check(backend)
    can_triton = triton_available() and (device.type == "cuda" or (device.type == "cpu" and interpreter_enabled()))
    if name == "auto":
        return "triton" if can_triton else "reference"
    if name == "triton" and not can_triton:
        if not triton_available():
            raise RuntimeError("backend 'triton' requested but triton is not installed")
        late = " (TRITON_INTERPRET=1 is set now, but was not when gtpt_kernels was imported)" \
            if device.type == "cpu" and _interpret_env() else ""
        raise RuntimeError(
            f"backend 'triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton is "
            f"imported; got tensors on {device}{late}")
    return name


def fall_back_or_raise(error: Exception, backend: Optional[str]) -> str:
    """For a call the kernels cannot serve: ``"reference"`` when the backend came from ``"auto"``, ``error`` raised
    when the caller asked for ``"triton"`` itself (per call or globally) - never a silent fallback from it."""
    if (backend if backend is not None else get_backend()).lower() == "triton":
        raise error
    return "reference"


def forward_ad_error(*tensors: Optional[torch.Tensor]) -> Optional[NotImplementedError]:
    """The error for a Triton call that forward-mode autodiff would see (:func:`forward_ad_active`), else None."""
    if not forward_ad_active(*tensors):
        return None
    return NotImplementedError("backend 'triton' has no forward-mode autodiff (jvp); use backend 'reference' or "
                               "'auto'")


def forward_ad_active(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether forward-mode autodiff would see this call: a ``torch.func.jvp`` (or ``jacfwd``) transform is active, or
    one of ``tensors`` is a dual tensor of ``torch.autograd.forward_ad``. The kernels have no forward-mode rule
    (torch would hand back zero or missing tangents, silently), so such calls go to the reference, which has one."""
    if torch.compiler.is_compiling():  # Dynamo cannot trace the probes; it has no forward-mode path here either
        return False
    # Cheap checks first (this runs on every call): no functorch transform and no dual level is the common case.
    try:
        transform_active = torch._C._functorch.peek_interpreter_stack() is not None
    except AttributeError:  # pragma: no cover - depends on the torch version
        transform_active = True
    if transform_active:
        try:
            from torch._C._functorch import TransformType
            from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
            if any(i.key() == TransformType.Jvp for i in retrieve_all_functorch_interpreters()):
                return True
        except (ImportError, AttributeError):  # pragma: no cover - depends on the torch version
            pass
    if getattr(_forward_ad, "_current_level", -1) < 0:
        return False
    return any(t is not None and _forward_ad.unpack_dual(t).tangent is not None for t in tensors)


DIRECT_LAUNCH_ENV_VAR = "GTPT_KERNELS_DIRECT_LAUNCH"
# torch internals that tell whether a dispatch mode, a torch-function mode or a functorch transform is active.
# Without any of them (a torch that moved them) nothing is launched directly: the registration is always right.
try:
    _MODE_PROBES = (torch._C._len_torch_dispatch_stack, torch._C._is_torch_function_mode_enabled,
                    torch._C._functorch.peek_interpreter_stack)
except AttributeError:  # pragma: no cover - depends on the torch version
    _MODE_PROBES = None


def direct_launch(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether an op call may run its kernels directly instead of through its ``torch.library`` registration.

    The registration is what autograd, ``torch.compile``/``torch.export``, jit/fx tracing, ``FlopCounterMode`` and
    other dispatch or function modes, and functorch transforms (``vmap``, ``grad``) see; going through it costs
    the host about 12 us per call (measured on a 2-core CPU with the kernel launch stubbed out: ``token_prune``
    at the fine-L3 site 32.6 -> 21.1 us, ``group_attention`` forward 30.7 -> 17.8 us), which a microsecond-scale
    kernel at inference time cannot hide. So a call skips it only when none of those can be involved: plain
    tensors, no gradient wanted, nothing tracing, no mode active. Set ``GTPT_KERNELS_DIRECT_LAUNCH=0`` to always
    go through the registration.
    """
    if not _MODE_PROBES or os.environ.get(DIRECT_LAUNCH_ENV_VAR, "1") in ("0", "false", "False"):
        return False
    dispatch_depth, function_mode_on, functorch_level = _MODE_PROBES
    if (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()
            or dispatch_depth() or function_mode_on() or functorch_level() is not None):
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) is not torch.Tensor or (grad and t.requires_grad)):
            return False
    return True


def call_op(name: str, impl, op, *args):
    """Run the registered op ``op(*args)``, or its implementation ``impl(*args)`` directly where
    :func:`direct_launch` allows it for the tensors among ``args``. A direct call is wrapped in a
    ``record_function`` named ``name`` while the autograd profiler is on, so it still shows up in traces."""
    if not direct_launch(*(a for a in args if isinstance(a, torch.Tensor))):
        return op(*args)
    if torch.autograd._profiler_enabled():
        with torch.autograd.profiler.record_function(name):
            return impl(*args)
    return impl(*args)
