"""Issue 15: `gtpt infer VIDEO` -> a drawn video and per-frame poses, frames batched into shared forwards."""
import json

import numpy as np
import pytest

av = pytest.importorskip("av")

from gtpt.cli import main  # noqa: E402

FAST = ["--variant", "gtpt-t", "--no-flip", "--device", "cpu", "--backend", "reference"]
pytestmark = pytest.mark.usefixtures("one_thread")


def _write_clip(path, frames=5, size=(80, 60), fps=10):
    """A synthetic clip: a bright bar moving right over a changing background (made with PyAV itself)."""
    w, h = size
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            f = np.full((h, w, 3), 30 * i, np.uint8)
            f[10:50, 10 + 8 * i:24 + 8 * i] = 255
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_video_in_drawn_video_and_per_frame_json_out(tmp_path, monkeypatch, capsys):
    clip, out, drawn = tmp_path / "clip.mp4", tmp_path / "poses.json", tmp_path / "clip_pose.mp4"
    _write_clip(clip)
    import gtpt.inference as inf
    sizes, real = [], inf.predict_crops

    def spy(model, crops, flip):
        sizes.append(len(crops))
        return real(model, crops, flip)
    monkeypatch.setattr(inf, "predict_crops", spy)
    assert main(["infer", str(clip), "-o", str(out), "--vis", str(drawn), "--batch-size", "4", *FAST]) == 0
    entries = json.load(open(out))
    assert [e["frame"] for e in entries] == [0, 1, 2, 3, 4]
    assert [e["time_s"] for e in entries] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert all(e["image"] == str(clip) and e["box"] == [0.0, 0.0, 80.0, 60.0] for e in entries)
    assert sizes == [4, 1]  # frames share forwards (batch 4), not one forward per frame
    with av.open(str(drawn)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (60, 80, 3)
    assert "5 frame(s)" in capsys.readouterr().err


def test_unreadable_video_and_vis_of_the_wrong_kind(tmp_path, capsys):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 100)
    assert main(["infer", str(bad), "-o", str(tmp_path / "o.json"), *FAST]) == 2
    err = capsys.readouterr().err
    assert f"cannot read video {bad}" in err and "Traceback" not in err
    clip = tmp_path / "clip.mp4"
    _write_clip(clip, frames=1)
    assert main(["infer", str(clip), "-o", str(tmp_path / "o.json"), "--vis", str(tmp_path / "x.png"), *FAST]) == 2
    assert "must be a video file" in capsys.readouterr().err
