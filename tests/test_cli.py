"""The ``gtpt`` command line."""
import json
import os
import subprocess
import sys

import pytest
import torch

from gtpt.cli import main

SUBCOMMANDS = ("summary", "flops", "profile", "env", "train", "synth", "eval", "infer")


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in SUBCOMMANDS:
        assert cmd in out


def test_python_dash_m_entry_point():
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = subprocess.run([sys.executable, "-m", "gtpt", "--help"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode == 0 and all(c in p.stdout for c in SUBCOMMANDS)


def test_summary(capsys):
    assert main(["summary", "gtpt-t"]) == 0
    out = capsys.readouterr().out
    assert "gtpt-t" in out and "token schedule" in out


def test_flops_paper_table(capsys):
    assert main(["flops", "gtpt-t", "--convention", "paper"]) == 0
    out = capsys.readouterr().out
    assert "| gtpt-t | 2.371 M | 2.4 M | 0.663 | 0.663 | exact | 0.7 |" in out


def test_flops_json_full(capsys):
    assert main(["flops", "gtpt-t", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    r = rows[0]
    assert r["variant"] == "gtpt-t" and r["paper_macs"] == r["official_thop_macs"] == 663_179_264
    assert r["full_unpruned_macs"] > r["full_macs"] > r["paper_macs"]
    assert 0.3 < r["pruning_saving"] < 0.8


def test_profile_tiny(tmp_path, capsys):
    out_dir = tmp_path / "reports"
    rc = main(["profile", "--variants", "gtpt-t", "--batch-sizes", "1", "--warmup", "0", "--repeats", "1",
               "--no-stages", "--out-dir", str(out_dir), "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "exact" in out and "speedup of the pruned over the unpruned path" in out
    for name in ("profile.json", "profile.md", "profile.png"):
        assert (out_dir / name).is_file()
    data = json.loads((out_dir / "profile.json").read_text())
    assert data["flops"][0]["paper_macs"] == 663_179_264
    assert {r["path"] for r in data["latency"]} == {"pruned", "unpruned"}
    assert data["pruning_speedup_interleaved"][0]["variant"] == "gtpt-t"
    assert data["meta"]["command"].startswith("gtpt profile")


@pytest.mark.parametrize("argv,fragment", [
    (["profile", "--variants", "gtpt-xl"], "unknown GTPT variant 'gtpt-xl'"),
    (["flops", "gtpt-xl"], "unknown GTPT variant 'gtpt-xl'"),
    (["summary", "nope"], "unknown GTPT variant 'nope'"),
    (["profile", "--batch-sizes", "0"], "expected a positive integer"),
    (["profile", "--backends", "tensorrt"], "invalid choice"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_exit_2_with_one_line(argv, fragment, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse errors
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_profile_cuda_without_gpu(capsys):
    assert main(["profile", "--device", "cuda", "--no-flops"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_train_help_goes_to_the_training_parser(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: gtpt train") and "--train-ann-file" in out and "--amp" in out


def test_eval_train_then_evaluate_checkpoint(coco_tiny, tmp_path, capsys):
    """`gtpt train` writes model_final.pth; `gtpt eval` loads its EMA weights and scores them with pycocotools."""
    out_dir = tmp_path / "run"
    ann, images = f"{coco_tiny}/annotations/person_keypoints_tiny.json", f"{coco_tiny}/images"
    assert main(["train", "--variant", "gtpt-t", "--output-dir", str(out_dir), "--train-ann-file", ann,
                 "--train-image-root", images, "--epochs", "1", "--batch-size", "4", "--workers", "0",
                 "--backend", "reference", "--device", "cpu", "--log-every", "1", "--max-steps", "1"]) == 0
    ckpt = out_dir / "model_final.pth"
    assert ckpt.is_file()
    capsys.readouterr()
    results = tmp_path / "results.json"
    assert main(["eval", "--variant", "gtpt-t", "--checkpoint", str(ckpt), "--ann-file", ann, "--image-root",
                 images, "--backend", "reference", "--device", "cpu", "--batch-size", "8", "--results",
                 str(results), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) >= {"AP", "AP50", "AR"} and all(-1.0 <= v <= 1.0 for v in metrics.values())
    preds = json.loads(results.read_text())
    assert len(preds) >= 1 and len(preds[0]["keypoints"]) == 17 * 3
    # The student copy differs from the EMA after a step, so its predictions do too.
    student = tmp_path / "student.json"
    assert main(["eval", "--variant", "gtpt-t", "--checkpoint", str(ckpt), "--weights", "student", "--ann-file", ann,
                 "--image-root", images, "--backend", "reference", "--device", "cpu", "--results", str(student)]) == 0
    assert json.loads(student.read_text()) != preds


def test_curriculum_body_run_initialises_wholebody_run(coco_tiny, tmp_path, capsys):
    """The README's curriculum through the command line: a body run's model_final.pth initialises a WholeBody run
    (--init-from) on the WholeBody annotations, whose checkpoint `gtpt eval` scores on all six parts."""
    images = f"{coco_tiny}/images"
    common = ["--epochs", "1", "--batch-size", "4", "--workers", "0", "--backend", "reference", "--device", "cpu",
              "--max-steps", "1"]
    body = tmp_path / "body"
    assert main(["train", "--variant", "gtpt-t", "--output-dir", str(body), "--train-ann-file",
                 f"{coco_tiny}/annotations/person_keypoints_tiny.json", "--train-image-root", images] + common) == 0
    wb_ann = f"{coco_tiny}/annotations/coco_wholebody_tiny.json"
    wb = tmp_path / "wholebody"
    assert main(["train", "--variant", "gtpt-t-wholebody", "--output-dir", str(wb), "--train-ann-file", wb_ann,
                 "--train-image-root", images, "--init-from", str(body / "model_final.pth")] + common) == 0
    start = json.loads((wb / "log.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start"
    assert start["init"]["new"] == ["features.extra_token", "features.fine_keypoint_token"]
    capsys.readouterr()
    assert main(["eval", "--variant", "gtpt-t-wholebody", "--checkpoint", str(wb / "model_final.pth"), "--ann-file",
                 wb_ann, "--image-root", images, "--backend", "reference", "--device", "cpu", "--no-flip",
                 "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {"body", "foot", "face", "lefthand", "righthand", "wholebody"}


def test_eval_bad_annotation_file_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "ann.json"
    bad.write_text("{not json")
    assert main(["eval", "--variant", "gtpt-t", "--ann-file", str(bad), "--image-root", str(tmp_path),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("gtpt eval: error:") and "ann.json" in err[-1]


def test_docs_profiling_is_the_readme_profile_section():
    # docs/profiling.md is the README's profiling section on its own page; the two must not drift apart.
    import os
    import re
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = open(os.path.join(root, "README.md")).read()
    section = re.search(r"<!-- profile:start -->\n(.*?)<!-- profile:end -->", readme, re.S).group(1)
    assert open(os.path.join(root, "docs", "profiling.md")).read() == section


def test_profile_interrupted_before_the_sweep_still_writes_the_report(tmp_path, monkeypatch, capsys):
    # A timeout's SIGTERM during the FLOP count (before the latency sweep) must not lose the report.
    import json
    import os
    import signal
    import gtpt.cli as cli

    def interrupted(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the SIGTERM should have interrupted before this line")
    monkeypatch.setattr(cli, "flops_rows", interrupted)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["profile", "--variants", "gtpt-t", "--batch-sizes", "1", "--out-dir", str(tmp_path), "--quiet"]) == 0
    assert signal.getsignal(signal.SIGTERM) is before
    assert "interrupted before the latency sweep" in capsys.readouterr().err
    assert json.load(open(tmp_path / "profile.json"))["latency"] == []


@pytest.mark.parametrize("argv, fragment", [
    (["profile", "--device", "gpu"], "--device must be cpu, cuda, cuda:N or auto"),
    (["profile", "--device", "mps"], "--device must be cpu, cuda, cuda:N or auto"),
    (["profile", "--budget-s", "nan"], "--budget-s must be a non-negative"),
    (["profile", "--budget-s", "-1"], "--budget-s must be a non-negative"),
    (["summary", "all", "gtpt-x"], "unknown GTPT variant 'gtpt-x'"),
])
def test_more_bad_arguments_exit_2_with_one_line(argv, fragment, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1


def test_profile_unwritable_out_dir_fails_before_measuring(tmp_path, capsys, monkeypatch):
    import gtpt.profiler as profiler
    monkeypatch.setattr(profiler, "profile", lambda *a, **k: pytest.fail("measured before checking --out-dir"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["profile", "--no-flops", "--out-dir", str(blocker / "sub")]) == 2
    assert "is not a writable directory" in capsys.readouterr().err


def test_profile_report_command_and_duplicate_variants(tmp_path, capsys):
    import json
    assert main(["profile", "--variants", "gtpt-t", "gtpt_t", "--batch-sizes", "1", "--repeats", "1", "--warmup", "0",
                 "--no-flops", "--no-stages", "--paths", "pruned", "--out-dir", str(tmp_path), "--quiet"]) == 0
    data = json.load(open(tmp_path / "profile.json"))
    assert data["meta"]["command"].startswith("gtpt profile --variants")
    assert [r["variant"] for r in data["latency"]] == ["gtpt-t"]  # gtpt_t is the same variant: timed once
