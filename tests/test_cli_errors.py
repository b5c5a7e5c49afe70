"""Issue 15: one-line errors for every command, checks before work, help without torch, variant from the
checkpoint, a profile that copes with a loaded machine."""
import json
import os
import subprocess
import sys

import pytest
import torch

from gtpt.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = "000000040083.jpg"  # 500 x 333

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(argv):
    try:
        return main(argv)
    except SystemExit as e:  # argparse
        return e.code


def _one_line(capsys):
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def t_checkpoint(tmp_path_factory):
    """A gtpt-t run's model_final.pth layout (student + ema_ copy)."""
    from gtpt import build_model
    torch.manual_seed(0)
    sd = build_model("gtpt-t", backend="reference").state_dict()
    path = tmp_path_factory.mktemp("run_t") / "model_final.pth"
    torch.save({**sd, **{"ema_" + k: v for k, v in sd.items()}}, path)
    return str(path)


# -- finding 7: help without torch, eval --help has a description ------------------------------------------------

def test_help_does_not_import_torch():
    code = ("import sys, gtpt.cli as c\n"
            "for argv in (['--help'], ['infer', '--help'], ['eval', '--help'], ['profile', '--help'],\n"
            "             ['synth', '--help'], ['summary', '--help'], ['flops', '--help'], ['env', '--help'],\n"
            "             ['export', '--help']):\n"
            "    try:\n"
            "        c.main(argv)\n"
            "    except SystemExit as e:\n"
            "        assert e.code == 0\n"
            "assert 'torch' not in sys.modules, 'help imported torch'\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, PYTHONPATH=ROOT, GTPT_DEBUG="0"))
    assert p.returncode == 0, p.stderr
    assert "COCO / COCO-WholeBody keypoint AP of a checkpoint on an annotation file" in p.stdout  # eval description
    assert "folders of images and videos" in p.stdout                                          # infer description


def test_torch_free_option_names_match_the_code():
    from gtpt import cli_options as o
    from gtpt import evaluate, profiler, train
    from gtpt_kernels.backend import BACKENDS
    assert o.KERNEL_BACKENDS == BACKENDS and o.PROFILE_BACKENDS == profiler.BACKENDS
    assert o.PROFILE_DTYPES == tuple(profiler.DTYPES) and o.PROFILE_MODES == profiler.MODES
    assert o.AMP_NAMES == tuple(train.AMP_DTYPES)
    from gtpt import export
    assert (o.RUNTIME_NAMES, o.EXPORT_FORMATS) == (export.RUNTIMES, export.FORMATS)
    assert o.EXPORT_MIN_OPSET == export.MIN_OPSET
    assert (o.IN_VIS_THRESHOLD, o.OKS_NMS_THRESHOLD) == (evaluate.IN_VIS_THRESHOLD, evaluate.OKS_NMS_THRESHOLD)


# -- central handler: one line, exit 1 for unexpected errors, --debug for the traceback -----------------------------

def test_unexpected_error_is_one_line_exit_1_and_debug_shows_the_traceback(monkeypatch, capsys):
    import gtpt.cli as cli

    def boom(args):
        raise RuntimeError("disk on fire\nsecond line")
    monkeypatch.setattr(cli, "_cmd_env", boom)
    monkeypatch.setenv("GTPT_DEBUG", "0")  # main(--debug) sets it to 1; monkeypatch restores it afterwards
    assert main(["env"]) == 1
    line = _one_line(capsys)
    assert line.startswith("gtpt env: error: RuntimeError: disk on fire") and "--debug" in line
    with pytest.raises(RuntimeError, match="disk on fire"):
        main(["env", "--debug"])


# -- finding 2: output paths checked before any work ---------------------------------------------------------------

def test_infer_bad_output_path_fails_before_inference(coco_tiny, tmp_path, monkeypatch, capsys):
    import gtpt.inference as inf
    monkeypatch.setattr(inf, "PoseEstimator", lambda *a, **k: pytest.fail("built the model before checking -o"))
    (tmp_path / "file.jpg").write_text("x")
    image = os.path.join(coco_tiny, "images", IMAGE)
    assert _run(["infer", image, "-o", str(tmp_path / "file.jpg" / "a.json"), "--variant", "gtpt-t"]) == 2
    assert "file.jpg is a file, not a folder" in _one_line(capsys)
    assert _run(["infer", image, "-o", str(tmp_path), "--variant", "gtpt-t"]) == 2
    assert "is a folder" in _one_line(capsys)


def test_eval_bad_results_path_fails_before_evaluation(coco_tiny, tmp_path, monkeypatch, capsys):
    import gtpt.evaluate as ev
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: pytest.fail("evaluated before checking --results"))
    (tmp_path / "f").write_text("x")
    rc = _run(["eval", "--variant", "gtpt-t", "--ann-file", os.path.join(coco_tiny, "annotations",
                                                                         "person_keypoints_tiny.json"),
               "--image-root", os.path.join(coco_tiny, "images"), "--results", str(tmp_path / "f" / "r.json")])
    assert rc == 2 and "--results" in _one_line(capsys)


# -- finding 5: the variant comes from the checkpoint ----------------------------------------------------------------

def test_infer_reads_the_variant_from_the_checkpoint(coco_tiny, t_checkpoint, tmp_path, capsys):
    image = os.path.join(coco_tiny, "images", IMAGE)
    out = tmp_path / "p.json"
    assert main(["infer", image, "-o", str(out), "--checkpoint", t_checkpoint, "--box", "30,20,120,280",
                 "--no-flip", "--device", "cpu", "--backend", "reference"]) == 0
    assert len(json.load(open(out))[0]["keypoints"]) == 51
    capsys.readouterr()
    assert main(["infer", image, "-o", str(out), "--checkpoint", t_checkpoint, "--variant", "gtpt-s"]) == 2
    line = _one_line(capsys)
    assert "holds gtpt-t weights but --variant gtpt-s" in line and "--variant gtpt-t" in line and len(line) < 300
    from gtpt import PoseEstimator
    assert PoseEstimator.from_checkpoint(t_checkpoint, device="cpu").model.cfg.name == "gtpt-t"


def test_non_gtpt_checkpoint_is_one_line(tmp_path, coco_tiny, capsys):
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, path)
    image = os.path.join(coco_tiny, "images", IMAGE)
    assert main(["infer", image, "-o", str(tmp_path / "o.json"), "--checkpoint", str(path)]) == 2
    assert "no GTPT model tensors" in _one_line(capsys)


# -- finding 10: profile on a loaded machine -------------------------------------------------------------------------

class _FakeTimer:
    """Times from a script: each step 'takes' the next number in ``seq`` (ms)."""
    cuda = False

    def __init__(self, seq):
        self.seq, self.t = list(seq), 0.0

    def sync(self):
        pass

    def mark(self):
        return self.t

    def elapsed_ms(self, a, b):
        return b - a


def test_wide_spread_gets_more_repeats_and_says_so():
    from gtpt.profiler import SPREAD_MAX_FACTOR, time_interleaved
    steady = _FakeTimer([])
    calls = []

    def step(name, ms_fn):
        def run():
            calls.append(name)
            steady.t += ms_fn(len(calls))
        return run
    # steady contenders: 5 rounds only, no note
    times, note = time_interleaved({"a": step("a", lambda n: 10.0), "b": step("b", lambda n: 20.0)}, steady, 5)
    assert len(times["a"]) == 5 and note == "" and calls[:4] == ["a", "b", "a", "b"]  # interleaved
    # a noisy contender (every third call 3x slower): more rounds, up to the cap, and the note says so
    calls.clear()
    times, note = time_interleaved({"a": step("a", lambda n: 30.0 if n % 3 == 0 else 10.0),
                                    "b": step("b", lambda n: 20.0)}, steady, 5)
    assert len(times["a"]) > 5 and len(times["a"]) <= SPREAD_MAX_FACTOR * 5
    assert "spread p80/p20" in note and f"timed {len(times['a'])}" in note


def test_profile_report_keeps_the_load_figure(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(os, "getloadavg", lambda: (7.5, 7.0, 6.0))
    assert main(["profile", "--variants", "gtpt-t", "--batch-sizes", "1", "--warmup", "0", "--repeats", "1",
                 "--no-stages", "--no-flops", "--out-dir", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    md = (tmp_path / "profile.md").read_text()
    data = json.load(open(tmp_path / "profile.json"))
    assert "load average 7.5" in md and data["meta"]["load_average_start"] == 7.5
    assert "timed with 1 CPU thread" in md and data["meta"]["torch_threads"] == 1  # no OpenMP oversubscription
    assert "load average 7.5" in data["meta"]["load_note"] and "load average 7.5" in out
    assert md.count("n/a on CPU") == 1 and "peak memory n/a" not in md
    assert "interleaved" in out  # the headline says how the paths were timed
    assert data["pruning_speedup_interleaved"][0]["variant"] == "gtpt-t"  # from the sweep, not a second run


# -- finding 11: the README's Model snippet ------------------------------------------------------------------------

def test_readme_model_snippet_names_no_missing_file_and_says_where_weights_come_from():
    readme = open(os.path.join(ROOT, "README.md")).read()
    model = " ".join(readme[readme.index("### Model"):readme.index("## Training, evaluation, inference")].split())
    assert "gtpt_s_coco.pth" not in model
    assert "github.com/haonanwang0522/GTPT" in model and "Google Drive" in model
    assert "0.01" in model and "boxes only" in model
