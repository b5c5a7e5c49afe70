"""Video in and out for ``gtpt infer`` through PyAV (``pip install -e ".[video]"``; FFmpeg's decoders and
encoders, no OpenCV).

Frames are decoded to RGB arrays in display order; the drawn video is written with the input's frame rate and
size (H.264 for ``.mp4`` / ``.mkv`` / ``.mov``, MPEG-4 part 2 for ``.avi``, VP8 for ``.webm``).
"""
from __future__ import annotations

import os
from fractions import Fraction
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np

_CODECS = {".mp4": ("libx264", "h264", "mpeg4"), ".mkv": ("libx264", "h264", "mpeg4"),
           ".mov": ("libx264", "h264", "mpeg4"), ".m4v": ("libx264", "h264", "mpeg4"),
           ".avi": ("mpeg4",), ".webm": ("libvpx", "libvpx-vp9")}


def _av():
    try:
        import av
    except ImportError:  # an optional dependency: say how to get it
        raise ValueError("video input needs PyAV: pip install av (or pip install -e \".[video]\")") from None
    return av


def probe_video(path: str) -> Dict[str, Any]:
    """Open ``path``, check it has a video stream and decode its first frame. Returns ``fps`` (a Fraction),
    ``frames`` (as the container says; may be 0 when unknown), ``width``, ``height``. Unreadable: ValueError."""
    av = _av()
    try:
        with av.open(path) as c:
            if not c.streams.video:
                raise ValueError("no video stream")
            s = c.streams.video[0]
            first = next(c.decode(s), None)
            if first is None:
                raise ValueError("no decodable frame")
            return {"fps": Fraction(s.average_rate or s.guessed_rate or 25), "frames": int(s.frames or 0),
                    "width": first.width, "height": first.height}
    except ValueError:
        raise
    except Exception as e:  # av.error.* (InvalidDataError, ...) and OSError: one reason, not PyAV's class tree
        raise ValueError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None


def iter_frames(path: str) -> Iterator[Tuple[int, float, np.ndarray]]:
    """``(index, time in seconds, H x W x 3 uint8 RGB)`` for every frame of the first video stream."""
    av = _av()
    with av.open(path) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        for i, frame in enumerate(c.decode(s)):
            t = float(frame.pts * s.time_base) if frame.pts is not None and s.time_base else float("nan")
            yield i, t, frame.to_ndarray(format="rgb24")


class VideoWriter:
    """Write RGB frames to ``path`` (codec from its extension) at ``fps``; use as a context manager."""

    def __init__(self, path: str, fps: Fraction, width: int, height: int):
        av = _av()
        ext = os.path.splitext(path)[1].lower()
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        self.container = av.open(path, mode="w")
        last: Optional[Exception] = None
        for name in _CODECS.get(ext, ("libx264", "h264", "mpeg4")):
            try:
                self.stream = self.container.add_stream(name, rate=Fraction(fps).limit_denominator(1000))
                break
            except Exception as e:  # this build lacks the encoder: try the next one
                last = e
        else:
            self.container.close()
            raise ValueError(f"cannot write {path}: no encoder for {ext} in this PyAV build ({last})")
        # yuv420p needs even sizes: pad by one pixel where needed (the drawing itself is untouched).
        self.width, self.height = width + width % 2, height + height % 2
        self.stream.width, self.stream.height = self.width, self.height
        self.stream.pix_fmt = "yuv420p"

    def write(self, rgb: np.ndarray) -> None:
        av = _av()
        h, w = rgb.shape[:2]
        if (w, h) != (self.width, self.height):
            padded = np.zeros((self.height, self.width, 3), np.uint8)
            padded[:h, :w] = rgb
            rgb = padded
        for packet in self.stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
