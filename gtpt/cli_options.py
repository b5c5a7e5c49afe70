"""Options of ``gtpt eval`` and ``gtpt infer``, and the names the ``gtpt`` parsers offer, without importing torch.

``gtpt --help`` and ``gtpt <command> --help`` build their parsers from this module and :mod:`gtpt.config` only,
so they answer in a fraction of a second instead of the seconds torch takes to import. The name tuples repeat
the ones defined next to the code that uses them (``gtpt_kernels.backend.BACKENDS``, ``gtpt.profiler``,
``gtpt.train.AMP_DTYPES``, ``gtpt.evaluate``'s thresholds); ``tests/test_cli_errors.py`` checks they agree.
"""
from __future__ import annotations

import argparse
from typing import Callable, Optional

from .config import list_variants

KERNEL_BACKENDS = ("auto", "reference", "triton")                 # gtpt_kernels.backend.BACKENDS
PROFILE_BACKENDS = ("reference", "triton", "compile", "compile-reduce-overhead", "compile-triton",
                    "compile-triton-reduce-overhead", "cudagraph", "cudagraph-reference")  # gtpt.profiler.BACKENDS
PROFILE_DTYPES = ("fp32", "bf16", "fp16")                         # gtpt.profiler.DTYPES
PROFILE_MODES = ("inference", "train")                            # gtpt.profiler.MODES
AMP_NAMES = ("none", "bf16", "fp16")                              # gtpt.train.AMP_DTYPES
RUNTIME_NAMES = ("torch", "onnxruntime", "pt2")                   # gtpt.export.RUNTIMES
EXPORT_FORMATS = ("onnx", "pt2")                                  # gtpt.export.FORMATS
EXPORT_MIN_OPSET = 17                                             # gtpt.export.MIN_OPSET
IN_VIS_THRESHOLD = 0.01                                           # gtpt.evaluate.IN_VIS_THRESHOLD (official)
OKS_NMS_THRESHOLD = 0.9                                           # gtpt.evaluate.OKS_NMS_THRESHOLD (official)

EVAL_DESCRIPTION = (
    "COCO / COCO-WholeBody keypoint AP of a checkpoint on an annotation file, scored with pycocotools as the "
    "official test does: EMA weights, flip test, detector boxes (--detections) or ground-truth boxes, OKS-NMS. "
    "Prints AP, AP50, AP75, APm, APl, AR (per part for WholeBody); --results keeps the predictions.")

INFER_DESCRIPTION = (
    "Poses from person boxes on images, folders of images and videos. Writes one JSON (one entry per person; "
    "video entries carry their frame number) and, with --vis, drawings (a drawn video for a video input). Boxes: "
    "--box (every image), --boxes (a JSON mapping file name -> boxes), --detections (COCO detection results, "
    "matched by file name or image id) or, by default, the whole image. Without --checkpoint the weights are "
    "random; with one, the variant is read from it.")


def int_at_least(low: int, what: Optional[str] = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``low``; the error reads "expected <what>, got '...'"."""
    what = what or f"an integer >= {low}"

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v
    return parse


positive_int = int_at_least(1, "a positive integer")
nonneg_int = int_at_least(0, "a non-negative integer")


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``gtpt eval`` options (pair with ``set_defaults(func=gtpt.evaluate.run_eval_cli)``)."""
    parser.add_argument("--variant", default=None,
                        help=f"model variant: {', '.join(list_variants())} (default: read from --checkpoint, "
                             f"else gtpt-s)")
    parser.add_argument("--checkpoint", help="official GTPT .pth or one of `gtpt train`'s (EMA weights are used); "
                                             "without it the weights are random and the AP is meaningless")
    parser.add_argument("--weights", choices=("ema", "student"), default="ema",
                        help="which copy of a checkpoint holding both to score (default ema, as the official test; "
                             "student is useful early in a run, while the EMA still lags)")
    parser.add_argument("--ann-file", required=True, help="COCO person_keypoints / COCO-WholeBody annotation JSON")
    parser.add_argument("--image-root", required=True, help="folder holding the annotation's images")
    parser.add_argument("--detections", help="person detection results JSON (the official test uses "
                                             "COCO_val2017_detections_AP_H_56_person.json); default: GT boxes")
    parser.add_argument("--det-score-thr", type=float, default=0.0, help="detection score threshold (default 0.0, "
                                                                         "as the official test)")
    parser.add_argument("--no-flip", action="store_true", help="no flip test")
    parser.add_argument("--batch-size", type=int, default=32, help="crops per forward (default 32)")
    parser.add_argument("--workers", type=int, default=0, help="data loader workers (default 0)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--backend", choices=KERNEL_BACKENDS, default="auto",
                        help="gtpt_kernels backend (default auto)")
    parser.add_argument("--amp", choices=AMP_NAMES, default="none", help="autocast dtype")
    parser.add_argument("--results", help="write the COCO results JSON here (checked writable before evaluating)")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    return parser


def add_infer_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``gtpt infer`` options (pair with ``set_defaults(func=gtpt.inference.run_inference_cli)``)."""
    parser.add_argument("images", nargs="+", metavar="INPUT",
                        help="image files, folders of images (not recursive) and video files (.mp4, .avi, .mov, "
                             ".mkv, .webm, ...)")
    parser.add_argument("-o", "--output", required=True,
                        help="output JSON: one entry per person (image, frame for videos, box, score, keypoints)")
    parser.add_argument("--variant", default=None,
                        help=f"model variant: {', '.join(list_variants())} (default: read from --checkpoint, "
                             f"else gtpt-s)")
    parser.add_argument("--checkpoint", help="official GTPT .pth or one of `gtpt train`'s; without it the weights "
                                             "are random")
    boxes = parser.add_mutually_exclusive_group()
    boxes.add_argument("--detections", help="COCO detection results JSON (image_id, bbox, score, category_id), "
                                            "matched to inputs by a 'file_name' field, by the images list of "
                                            "--ann-file (or of the file itself), or by file names that are COCO "
                                            "image ids")
    boxes.add_argument("--boxes", metavar="JSON",
                       help="per-image boxes: a JSON object mapping a file name (as given, or its base name) to a "
                            "list of [x, y, w, h] or {\"bbox\": [x, y, w, h], \"score\": s}")
    boxes.add_argument("--box", action="append", metavar="X,Y,W,H",
                       help="a person box for every image and frame (repeatable; negative values allowed, e.g. "
                            "--box -20,10,300,400); default: the whole image")
    parser.add_argument("--ann-file", help="COCO annotation (or image list) JSON whose 'images' map file_name to "
                                           "the image ids of --detections")
    parser.add_argument("--det-score-thr", type=float, default=0.5,
                        help="keep detections with score >= this (default 0.5; the official COCO test uses 0.0)")
    parser.add_argument("--no-nms", action="store_true", help=f"skip OKS-NMS (default threshold {OKS_NMS_THRESHOLD})")
    parser.add_argument("--no-flip", action="store_true", help="no flip test")
    parser.add_argument("--vis", help="draw the poses: a file (.png/.jpg; .mp4 etc. for a video) for one input, "
                                      "else a folder (drawings mirror the inputs' folders: NAME_pose.png, "
                                      "NAME_pose.mp4)")
    parser.add_argument("--kpt-thr", type=float, default=IN_VIS_THRESHOLD,
                        help=f"confidence to draw a joint (default {IN_VIS_THRESHOLD}, the official visibility "
                             f"threshold; GTPT's confidences stay below ~0.1)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip unreadable inputs with a warning (default: an unreadable input is an error "
                             "before any inference)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--backend", choices=KERNEL_BACKENDS, default="auto",
                        help="gtpt_kernels backend (default auto)")
    parser.add_argument("--batch-size", type=positive_int, default=32,
                        help="crops per forward, across images and video frames (default 32)")
    parser.add_argument("--runtime", choices=RUNTIME_NAMES, default="torch",
                        help="what runs the model: torch (eager, default), onnxruntime (CPU) or pt2 (AOTInductor)")
    parser.add_argument("--exported", metavar="FILE",
                        help="the .onnx / .pt2 file for --runtime (from gtpt export); default: export on the fly")
    return parser


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``gtpt export`` options (run by :func:`gtpt.export.run_export_cli`)."""
    parser.add_argument("variant", help=f"model variant: {', '.join(list_variants())}")
    parser.add_argument("--checkpoint", help="official GTPT .pth (EMA weights); without it the weights are random")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS,
                        help="onnx (ONNX Runtime, TensorRT, OpenVINO) or pt2 (torch.export + AOTInductor package)")
    parser.add_argument("-o", "--output", required=True, help="output file (a .pt2 package must end in .pt2)")
    parser.add_argument("--decode", action="store_true",
                        help="add decoded keypoints (crop pixels) and scores outputs to the graph")
    parser.add_argument("--opset", type=int, default=EXPORT_MIN_OPSET,
                        help=f"ONNX opset (default {EXPORT_MIN_OPSET}: TorchScript exporter; >= 18: dynamo exporter)")
    parser.add_argument("--device", default="cpu", help="pt2 only: cpu (compiled C++) or cuda (our Triton kernels)")
    return parser
