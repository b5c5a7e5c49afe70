"""Deployment exports of a GTPT model: ONNX (ONNX Runtime, TensorRT, OpenVINO, mmdeploy-style) and ``.pt2``
packages (``torch.export`` + AOTInductor), their loaders, and the runner :class:`gtpt.inference.PoseEstimator`
uses for ``runtime="onnxruntime" | "pt2"``.

Both formats take ``images`` ``(N, 3, 256, 192)`` float32 (normalised RGB crops, the eager model's input; the
batch axis is dynamic) and give ``simcc_x`` ``(N, K, 384)`` and ``simcc_y`` ``(N, K, 512)``, the SimCC logits
of the eval (pruned) path, named as mmdeploy names them. ``decode=True`` adds ``keypoints`` ``(N, K, 2)`` (crop
pixels: argmax / split ratio) and ``scores`` ``(N, K)`` (min of the two maximum softmax probabilities), the
decoding of :func:`gtpt.evaluate.decode_simcc`, computed in the graph.

The model is exported on the reference ops (:mod:`gtpt_kernels.reference`): ONNX cannot carry Triton kernels,
and on CPU the reference is what runs. A CUDA ``.pt2`` is exported on the Triton backend, so the package carries
the fused kernels (the ops are ``torch.library.triton_op``\\ s, which AOTInductor compiles into the package).
Token pruning exports as ``TopK`` + gather with the eager ranking, ties included
(:func:`gtpt_kernels.reference.topk_indices_exportable`).

Any ``nn.Module`` whose eval forward maps ``images`` to ``(simcc_x, simcc_y)`` exports the same way (a ``cfg``
attribute, as :class:`gtpt.model.GTPT` has, supplies the input size and the metadata; without one the input is
256 x 192).
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
import warnings
from typing import Any, Dict, Iterator, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .checkpoint import load_official_checkpoint
from . import export_graph
from .config import get_config
from .evaluate import decode_simcc

FORMATS = ("onnx", "pt2")
RUNTIMES = ("torch", "onnxruntime", "pt2")
INPUT_NAME = "images"
OUTPUT_NAMES = ("simcc_x", "simcc_y")
DECODED_NAMES = ("keypoints", "scores")
MIN_OPSET = 17
# Largest batch the exported graphs accept (torch.export needs a bound for the symbolic batch size).
MAX_BATCH = 4096

PathLike = Union[str, os.PathLike]
ModelOrVariant = Union[nn.Module, str]


class _Decoded(nn.Module):
    """``model`` followed by the SimCC decoding: ``(simcc_x, simcc_y, keypoints, scores)``."""

    def __init__(self, model: nn.Module, split_ratio: float):
        super().__init__()
        self.model = model
        self.split_ratio = float(split_ratio)

    def forward(self, images: Tensor):
        x, y = self.model(images)
        keypoints, scores = decode_simcc(x, y, self.split_ratio)
        return x, y, keypoints, scores


def _build(model_or_variant: ModelOrVariant, checkpoint: Optional[PathLike]) -> nn.Module:
    if isinstance(model_or_variant, str):
        from .model import build_model
        model = build_model(get_config(model_or_variant).name, backend="reference")
    elif isinstance(model_or_variant, nn.Module):
        model = model_or_variant
    else:
        raise TypeError(f"expected a variant name or an nn.Module, got {type(model_or_variant).__name__}")
    if checkpoint is not None:
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"checkpoint {os.fspath(checkpoint)!r} does not exist")
        load_official_checkpoint(model, checkpoint)
    return model


def check_output_path(path: PathLike, fmt: str) -> pathlib.Path:
    """The output file as a :class:`pathlib.Path`, after checking that its folder exists (or can be made) and is
    writable, and that a ``.pt2`` package is named ``*.pt2`` (AOTInductor requires it); one-line ``ValueError``
    otherwise. Called before any export work starts."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    p = pathlib.Path(os.fspath(path)).expanduser()
    if p.is_dir():
        raise ValueError(f"output {os.fspath(path)!r} is a directory; give a file name")
    if fmt == "pt2" and p.suffix != ".pt2":
        raise ValueError(f"output {os.fspath(path)!r}: a .pt2 package must be named *.pt2")
    folder = p.parent if str(p.parent) else pathlib.Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ValueError(f"output folder {str(folder)!r} is not writable ({e.strerror or e})") from None
    return p


def _image_size(model: nn.Module) -> Tuple[int, int]:
    cfg = getattr(model, "cfg", None)
    return tuple(getattr(cfg, "image_size", (256, 192)))  # type: ignore[return-value]


def export_metadata(model: nn.Module, decode: bool) -> Dict[str, str]:
    """String metadata stored in the exported file: input/output names and layout, and the variant's
    keypoint count, SimCC split ratio and input size (what a loader checks the file against)."""
    cfg = getattr(model, "cfg", None)
    h, w = _image_size(model)
    meta = {"gtpt_input": f"{INPUT_NAME} (N, 3, {h}, {w}) float32, normalised RGB",
            "gtpt_outputs": ",".join(OUTPUT_NAMES + (DECODED_NAMES if decode else ())),
            "gtpt_image_size": f"{h},{w}",
            "gtpt_tie_rule": "pruning ranks by descending score, ties: lower index first (as eager)"}
    if cfg is not None:
        meta.update({"gtpt_variant": str(getattr(cfg, "name", "")),
                     "gtpt_num_keypoints": str(getattr(cfg, "num_keypoints", "")),
                     "gtpt_simcc_split_ratio": str(getattr(cfg, "simcc_split_ratio", ""))})
    return meta


@contextlib.contextmanager
def _export_mode(model: nn.Module, backend: str) -> Iterator[None]:
    """The model in eval mode on ``backend`` (where it has ``set_backend``) for the export; restored after."""
    was_training = model.training
    old_backend = getattr(model, "backend", None)
    has_backend = callable(getattr(model, "set_backend", None))
    model.eval()
    if has_backend:
        model.set_backend(backend)
    try:
        with export_graph.folded_weights(model):
            yield
    finally:
        if has_backend:
            model.set_backend(old_backend)
        model.train(was_training)


def _example(model: nn.Module, device: torch.device) -> Tensor:
    h, w = _image_size(model)
    p = next(model.parameters(), None)
    dtype = p.dtype if p is not None else torch.float32
    # batch 2: torch.export specialises sizes 0 and 1, so an example of 1 would pin the batch axis
    return torch.randn(2, 3, h, w, device=device, dtype=dtype)


def _dynamic_shapes(dynamic_batch: bool):
    if not dynamic_batch:
        return None
    return {"images": {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}}


def _wrap(model: nn.Module, decode: bool) -> nn.Module:
    if not decode:
        return model
    cfg = getattr(model, "cfg", None)
    return _Decoded(model, getattr(cfg, "simcc_split_ratio", 2.0)).eval()


class _Named(nn.Module):
    """Gives the wrapped module's forward the argument name ``images`` (the dynamic-shape key and the graph's
    input name) whatever the module calls it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor):
        return self.model(images)


def export_onnx(model_or_variant: ModelOrVariant, path: PathLike, *, checkpoint: Optional[PathLike] = None,
                opset: int = MIN_OPSET, decode: bool = False, dynamic_batch: bool = True) -> pathlib.Path:
    """Export to one self-contained ONNX file (weights inside); returns its path.

    ``model_or_variant``: a variant name (built on the reference ops; random weights unless ``checkpoint``) or an
    ``nn.Module`` (exported in eval mode on the reference ops; its mode and backend are restored afterwards).
    Input ``images`` ``(N, 3, H, W)``; outputs ``simcc_x``, ``simcc_y`` and, with ``decode``, ``keypoints``,
    ``scores``; ``dynamic_batch=False`` fixes N to 2. The file's ``metadata_props`` record the variant,
    keypoint count and layout (:func:`export_metadata`).

    ``opset`` 17 (the default: what most deployed runtimes read) goes through PyTorch's TorchScript exporter,
    ``opset >= 18`` through the ``torch.export``-based (dynamo) exporter with onnxscript's optimiser. The dynamo
    exporter emits opset 18 and cannot convert this graph down to 17 (onnx has no Split 18 -> 17 adapter).
    Both give the same outputs (tested)."""
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset must be an integer >= {MIN_OPSET}, got {opset!r}")
    out = check_output_path(path, "onnx")
    model = _build(model_or_variant, checkpoint)
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("export_onnx needs the model on the CPU (model.cpu())")
    import onnx

    names = list(OUTPUT_NAMES + (DECODED_NAMES if decode else ()))
    tmp = out.with_name(out.name + ".tmp")
    with _export_mode(model, "reference"), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer / deprecation chatter, not actionable for the user
        wrapped = _Named(_wrap(model, decode)).eval()
        example = _example(model, torch.device("cpu"))
        if opset == MIN_OPSET:
            axes = {n: {0: "batch"} for n in [INPUT_NAME] + names} if dynamic_batch else None
            torch.onnx.export(wrapped, (example,), str(tmp), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=names, dynamic_axes=axes,
                              do_constant_folding=True)
            proto = onnx.load(str(tmp))
        else:
            program = torch.onnx.export(wrapped, (example,), None, dynamo=True, opset_version=opset,
                                        input_names=[INPUT_NAME], output_names=names,
                                        dynamic_shapes=_dynamic_shapes(dynamic_batch), optimize=True,
                                        verbose=False)
            proto = program.model_proto
    got = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=None)
    if got != opset:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"the ONNX exporter wrote opset {got}, not the requested {opset}")
    for k, v in export_metadata(model, decode).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save_model(proto, str(tmp))
    os.replace(tmp, out)
    return out


def export_pt2(model_or_variant: ModelOrVariant, path: PathLike, *, checkpoint: Optional[PathLike] = None,
               device: Union[str, torch.device] = "cpu", decode: bool = False, dynamic_batch: bool = True,
               inductor_configs: Optional[Dict[str, Any]] = None) -> pathlib.Path:
    """``torch.export`` + AOTInductor package (``*.pt2``) for ``device``; returns its path.

    On CPU the package holds compiled C++ on the reference ops; on CUDA the model runs on the Triton backend,
    so the package holds our fused attention and pruning kernels. Load it with :func:`load_pt2`. Same input /
    outputs as :func:`export_onnx` (the outputs come back as a tuple in that order); the metadata is stored in
    the package (``load_pt2(path).get_metadata()``). ``inductor_configs`` go to ``aoti_compile_and_package``."""
    out = check_output_path(path, "pt2")
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("a CUDA .pt2 needs a CUDA device, and this machine has none")
    model = _build(model_or_variant, checkpoint)
    if isinstance(model_or_variant, str):
        model = model.to(dev)
    model_device = next(model.parameters()).device
    if model_device.type != dev.type:
        raise ValueError(f"the model is on {model_device}; move it to {dev} first (or pass a variant name)")
    configs = {"aot_inductor.metadata": export_metadata(model, decode)}
    configs.update(inductor_configs or {})
    with _export_mode(model, "reference" if dev.type == "cpu" else "triton"), torch.no_grad():
        program = torch.export.export(_Named(_wrap(model, decode)).eval(), (_example(model, dev),),
                                      dynamic_shapes=_dynamic_shapes(dynamic_batch))
        tmp = out.with_name(out.stem + ".tmp.pt2")
        torch._inductor.aoti_compile_and_package(program, package_path=str(tmp), inductor_configs=configs)
    os.replace(tmp, out)
    return out


def load_onnx_session(path: PathLike, threads: Optional[int] = None):
    """An ONNX Runtime ``InferenceSession`` on the CPU execution provider, all graph optimisations on,
    ``threads`` intra-op threads (None: ONNX Runtime's default, one per physical core)."""
    import onnxruntime as ort

    if not os.path.isfile(path):
        raise FileNotFoundError(f"ONNX file {os.fspath(path)!r} does not exist")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.inter_op_num_threads = 1
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        opts.intra_op_num_threads = int(threads)
    opts.log_severity_level = 3  # warnings about unused initialisers etc. are not the user's problem
    return ort.InferenceSession(os.fspath(path), sess_options=opts, providers=["CPUExecutionProvider"])


def load_pt2(path: PathLike):
    """The AOTInductor package at ``path`` (``torch._inductor.aoti_load_package``): call it with an ``images``
    tensor on the package's device; it returns the outputs as a list."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f".pt2 package {os.fspath(path)!r} does not exist")
    return torch._inductor.aoti_load_package(os.fspath(path))


# ----------------------------------------------------------------------------------------------------------------
# Runners: an exported file behind the eager model's eval call, for gtpt.inference.PoseEstimator

def read_metadata(session_or_package: Any) -> Dict[str, str]:
    """The metadata of a loaded export: an ONNX Runtime session's ``custom_metadata_map`` or a ``.pt2``
    package's ``get_metadata()`` (the ``gtpt_*`` keys of :func:`export_metadata`, plus AOTInductor's own)."""
    if hasattr(session_or_package, "get_modelmeta"):
        return dict(session_or_package.get_modelmeta().custom_metadata_map)
    if hasattr(session_or_package, "get_metadata"):
        return dict(session_or_package.get_metadata())
    raise TypeError("read_metadata needs an onnxruntime session or a loaded .pt2 package")


class ExportedRunner:
    """Runs an exported file (``runtime`` ``"onnxruntime"`` or ``"pt2"``) the way the eager model runs in eval:
    ``runner(images)`` -> ``(simcc_x, simcc_y)`` tensors on the images' device. It has the model's ``cfg`` and
    ``training = False``, so :func:`gtpt.evaluate.predict_crops` (flip test, decoding) takes it in place of the
    model: every runtime shares the pre- and post-processing.

    ``path`` None: ``model`` is exported now (ONNX at the default opset; ``.pt2`` for ``device``) into a
    temporary folder that lives as long as the runner. A given file is checked against ``cfg`` (keypoint count
    in its metadata) and must have been exported without ``decode`` or with it (the first two outputs are
    used either way). ``threads``: ONNX Runtime's intra-op threads (a ``.pt2`` runs on torch's)."""

    training = False

    def __init__(self, runtime: str, cfg, path: Optional[PathLike] = None, model: Optional[nn.Module] = None,
                 device: Union[str, torch.device] = "cpu", threads: Optional[int] = None):
        if runtime not in RUNTIMES or runtime == "torch":
            raise ValueError(f"unknown exported runtime {runtime!r}; valid: onnxruntime, pt2")
        self.runtime, self.cfg, self.device = runtime, cfg, torch.device(device)
        if runtime == "onnxruntime" and self.device.type != "cpu":
            raise ValueError(f"runtime onnxruntime runs on the CPU (CPU execution provider), not {self.device}; "
                             f"use device='cpu'")
        self._tmp = None
        if path is None:
            if model is None:
                raise ValueError(f"runtime {runtime} needs an exported file or a model to export")
            self._tmp = tempfile.TemporaryDirectory(prefix="gtpt-export-")
            if runtime == "onnxruntime":
                path = export_onnx(model, os.path.join(self._tmp.name, "model.onnx"))
            else:
                path = export_pt2(model, os.path.join(self._tmp.name, "model.pt2"), device=self.device)
        self.path = pathlib.Path(os.fspath(path))
        suffix = ".onnx" if runtime == "onnxruntime" else ".pt2"
        if self.path.suffix != suffix:
            raise ValueError(f"runtime {runtime} needs a {suffix} file, got {os.fspath(path)!r}")
        if runtime == "onnxruntime":
            self._fn = load_onnx_session(self.path, threads)
        else:  # the package runs on torch's intra-op threads (torch.set_num_threads)
            self._fn = load_pt2(self.path)
        meta = read_metadata(self._fn)
        k = meta.get("gtpt_num_keypoints")
        if k and cfg is not None and int(k) != cfg.num_keypoints:
            raise ValueError(f"{os.fspath(path)} was exported for {meta.get('gtpt_variant', '?')} ({k} keypoints), "
                             f"not {cfg.name} ({cfg.num_keypoints})")

    def eval(self) -> "ExportedRunner":
        return self

    def __call__(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        if self.runtime == "onnxruntime":
            x, y = self._fn.run(list(OUTPUT_NAMES), {INPUT_NAME: images.detach().cpu().float().numpy()})
            return torch.from_numpy(x).to(images.device), torch.from_numpy(y).to(images.device)
        outs = self._fn(images.to(self.device))
        return outs[0], outs[1]


# ----------------------------------------------------------------------------------------------------------------
# gtpt export

from .cli_options import add_export_arguments  # noqa: E402,F401 - the options live torch-free there


def run_export_cli(args) -> int:
    """Run ``gtpt export``: 0 on success, 2 with one line for bad arguments, 1 with one line if the export fails."""
    import sys
    import time

    def fail(msg: str, code: int) -> int:
        print(f"gtpt export: error: {msg}", file=sys.stderr)
        return code

    try:
        variant = get_config(args.variant).name
        if args.format == "pt2" and args.opset != MIN_OPSET:
            raise ValueError("--opset applies to --format onnx only")
        if args.format == "onnx" and args.device != "cpu":
            raise ValueError("--device applies to --format pt2 only (ONNX export runs on the CPU)")
        if args.opset < MIN_OPSET:
            raise ValueError(f"--opset must be >= {MIN_OPSET}, got {args.opset}")
        if args.format == "pt2":
            try:
                dev = torch.device(args.device)
            except (RuntimeError, ValueError):
                dev = None
            if dev is None or dev.type not in ("cpu", "cuda"):
                raise ValueError(f"--device must be cpu or cuda, got {args.device!r}")
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise ValueError("--device cuda: this machine has no CUDA device")
        out = check_output_path(args.output, args.format)  # before minutes of export work, not after
        if args.checkpoint is not None and not os.path.isfile(args.checkpoint):
            raise ValueError(f"--checkpoint {args.checkpoint!r} does not exist")
        if args.checkpoint is None:
            print(f"gtpt export: warning: no --checkpoint, {variant} is exported with random weights",
                  file=sys.stderr)
        model = _build(variant, args.checkpoint)
    except (ValueError, FileNotFoundError) as e:  # CheckpointError is a ValueError
        return fail("; ".join(line.strip() for line in str(e).splitlines() if line.strip()), 2)
    t0 = time.perf_counter()
    try:
        if args.format == "onnx":
            path = export_onnx(model, out, opset=args.opset, decode=args.decode)
        else:
            path = export_pt2(model, out, device=args.device, decode=args.decode)
    except Exception as e:  # an exporter failure: one line, the exporter's own first line
        first = (str(e).strip().splitlines() or [""])[0]
        return fail(f"{args.format} export of {variant} failed: {type(e).__name__}: {first}", 1)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - t0:.0f} s)")
    return 0
