"""`gtpt train` as a newcomer meets it (issue 15, findings 1, 6, 7 and 12): one-line errors naming the flag or file,
checked before any work; the synthetic dataset when no data is given; the variant taken from the run folder; honest
banner, 1-based numbering, a labelled mean loss, ETA / progress bar, an interrupt message with the exact command, a
clear message when a finished run is started again; workers and help that fit the machine."""
import io
import json
import os
import re

import numpy as np
import pytest
import torch

import gtpt.train as T
from gtpt.cli import main as gtpt_main
from gtpt.synth import dataset_paths, generate
from gtpt.train import TrainConfig, build_arg_parser, default_workers, main, train

from test_train import SyntheticPoseDataset, read_log

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--batch-size", "2", "--workers", "0", "--backend", "reference", "--device", "cpu"]


def run(argv, capsys):
    """gtpt train ARGV -> (exit code, stdout, stderr)."""
    try:
        rc = gtpt_main(["train"] + argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(err, *needles):
    assert "Traceback" not in err and err.count("\n") == 1, err
    for n in needles:
        assert n in err, (n, err)


# ----------------------------------------------------------------------------------------------------------------
# The synthetic-data run shared by several tests: `gtpt train` with no data options, 2 steps

@pytest.fixture(scope="module")
def synth_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("synthrun")
    cache, out = base / "cache", base / "run"
    mp = pytest.MonkeyPatch()
    mp.setenv("GTPT_CACHE", str(cache))
    mp.setattr(T, "SYNTH_IMAGES", 8)  # 7 train + 1 val image keep the test short; the default is sized for a CPU
    import contextlib
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["--variant", "gtpt-t", "--output-dir", str(out), "--max-steps", "2", "--log-every", "1"] + FAST,
                  prog="gtpt train")
    yield {"rc": rc, "out": str(out), "cache": str(cache), "stdout": buf.getvalue(), "mp": mp}
    mp.undo()


def test_no_data_options_train_and_validate_on_the_synthetic_dataset(synth_run):
    assert synth_run["rc"] == 0, synth_run["stdout"]
    log = read_log(synth_run["out"])
    cfg = [r for r in log if r["event"] == "start"][0]["config"]
    assert cfg["train_ann_file"].startswith(synth_run["cache"]) and "person_keypoints_train.json" in cfg["train_ann_file"]
    assert cfg["val_ann_file"].endswith("person_keypoints_val.json")
    # the synthetic defaults (not the official 300 epochs / batch 64 / lr 1e-3 / cosine EMA from 0.996 / flip)
    assert (cfg["epochs"], cfg["ema_momentum"], cfg["flip"], cfg["augment"]) == (
        T.SYNTH_DEFAULTS["epochs"], T.SYNTH_DEFAULTS["ema_momentum"], False, T.SYNTH_DEFAULTS["augment"])
    assert (cfg["lr"], cfg["warmup_steps"], cfg["ema_schedule"]) == (
        T.SYNTH_DEFAULTS["lr"], T.SYNTH_DEFAULTS["warmup_steps"], "constant")
    assert cfg["joint_token_std"] == T.SYNTH_DEFAULTS["joint_token_std"]  # distinct joint tokens from the start
    assert "synth-easy-8-" in cfg["train_ann_file"]  # the easy generator setting
    assert cfg["batch_size"] == 2  # a flag given on the command line wins
    assert [r["global_step"] for r in log if r["event"] == "train"] == [1, 2]
    val = [r for r in log if r["event"] == "val"]
    assert len(val) == 1 and 0.0 <= val[0]["AP"] <= 1.0
    assert "synthetic dataset" in synth_run["stdout"] and "val epoch 1/" in synth_run["stdout"]


def test_finished_run_started_again_says_so_and_keeps_the_weights(synth_run, capsys):
    final = os.path.join(synth_run["out"], "model_final.pth")
    before = (os.path.getmtime(final), open(final, "rb").read())
    # no --variant: taken from the run folder's last.pth (it is gtpt-t; the default would also be gtpt-t, so check
    # the note)
    rc, out, err = run(["--output-dir", synth_run["out"], "--max-steps", "2"] + FAST, capsys)
    assert rc == 0, err
    assert "variant gtpt-t (from " in out and "last.pth" in out
    assert "already stopped at --max-steps 2" in out and "nothing to train" in out
    assert "final loss None" not in out and "None" not in out
    assert (os.path.getmtime(final), open(final, "rb").read()) == before


def test_run_folder_of_another_variant_is_one_line(synth_run, capsys):
    rc, out, err = run(["--variant", "gtpt-s", "--output-dir", synth_run["out"]] + FAST, capsys)
    assert rc == 1
    one_line_error(err, "gtpt-t run", "--variant gtpt-t", "--output-dir")


def test_truncated_last_pth_is_one_line(synth_run, tmp_path, capsys):
    data = open(os.path.join(synth_run["out"], "last.pth"), "rb").read()
    (tmp_path / "last.pth").write_bytes(data[: len(data) // 3])
    for variant in ([], ["--variant", "gtpt-t"]):  # with and without --variant (which reads last.pth first)
        rc, out, err = run(variant + ["--output-dir", str(tmp_path)] + FAST, capsys)
        assert rc == 1
        one_line_error(err, "cannot resume", "last.pth", "truncated", "move it away")
    assert (tmp_path / "last.pth").read_bytes() == data[: len(data) // 3]


def test_variant_from_init_checkpoint(synth_run, tmp_path, capsys, monkeypatch):
    """--init-from an official-layout model_final.pth without --variant: the variant is read off its tensors."""
    monkeypatch.setenv("GTPT_CACHE", synth_run["cache"])
    monkeypatch.setattr(T, "SYNTH_IMAGES", 8)
    final = os.path.join(synth_run["out"], "model_final.pth")
    rc, out, err = run(["--output-dir", str(tmp_path / "r"), "--init-from", final, "--max-steps", "1",
                        "--val-every", "5"] + FAST, capsys)
    assert rc == 0, err
    assert f"variant gtpt-t (from {final})" in out and "init from" in out


# ----------------------------------------------------------------------------------------------------------------
# One-line errors, before any work

def test_data_options_without_the_annotation_file_name_the_flag(tmp_path, capsys):
    rc, out, err = run(["--variant", "gtpt-t", "--output-dir", str(tmp_path / "r"), "--train-image-root",
                        str(tmp_path)], capsys)
    assert rc == 2
    one_line_error(err, "--train-ann-file")
    assert "TrainConfig" not in err and "train_ann_file" not in err
    assert not os.path.exists(tmp_path / "r")


def test_library_without_data_names_the_flag(tmp_path):
    with pytest.raises(T.TrainUsageError, match="--train-ann-file"):
        train(TrainConfig("gtpt-t", str(tmp_path / "r"), workers=0))


def test_missing_annotation_file(tmp_path, capsys):
    rc, out, err = run(["--variant", "gtpt-t", "--output-dir", str(tmp_path / "r"), "--train-ann-file",
                        str(tmp_path / "nope.json"), "--train-image-root", str(tmp_path)], capsys)
    assert rc == 2
    one_line_error(err, "--train-ann-file", "nope.json", "not found")


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tiny") / "d")
    generate(root, 3, seed=9)
    return dataset_paths(root)


def test_keypoints_of_the_wrong_length(tiny_coco, tmp_path, capsys):
    data = json.load(open(tiny_coco["train_ann_file"]))
    data["annotations"][0]["keypoints"] = data["annotations"][0]["keypoints"][:-3]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    rc, out, err = run(["--variant", "gtpt-t", "--output-dir", str(tmp_path / "r"), "--train-ann-file", str(bad),
                        "--train-image-root", tiny_coco["train_image_root"]] + FAST, capsys)
    assert rc == 1
    one_line_error(err, "--train-ann-file", "bad.json", "48 values, expected 51")
    # a bad validation file stops the run before the first step, not after the first epoch
    rc, out, err = run(["--variant", "gtpt-t", "--output-dir", str(tmp_path / "r2"),
                        "--train-ann-file", tiny_coco["train_ann_file"], "--train-image-root",
                        tiny_coco["train_image_root"], "--val-ann-file", str(bad), "--val-image-root",
                        tiny_coco["train_image_root"]] + FAST, capsys)
    assert rc == 1
    one_line_error(err, "--val-ann-file", "expected 51")
    assert not os.path.exists(tmp_path / "r2" / "log.jsonl")


def test_output_folder_under_a_file(tiny_coco, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    for out_dir in (tmp_path / "file.txt", tmp_path / "file.txt" / "run"):
        rc, out, err = run(["--variant", "gtpt-t", "--output-dir", str(out_dir), "--train-ann-file",
                            tiny_coco["train_ann_file"], "--train-image-root", tiny_coco["train_image_root"]], capsys)
        assert rc == 2
        one_line_error(err, "--output-dir", "is a file")


def test_bad_values_name_flags_not_fields(tmp_path, capsys):
    rc, out, err = run(["--variant", "gtpt-t", "--output-dir", str(tmp_path), "--ema-momentum", "2"], capsys)
    assert rc == 2
    one_line_error(err, "--ema-momentum")
    assert "TrainConfig" not in err
    rc, out, err = run(["--variant", "gtpt-x", "--output-dir", str(tmp_path)], capsys)
    assert rc == 2 and "gtpt-x" in err and "Traceback" not in err


def test_no_resume_message_names_the_flag(synth_run, capsys):
    rc, out, err = run(["--output-dir", synth_run["out"], "--no-resume", "--variant", "gtpt-t"] + FAST, capsys)
    assert rc == 2
    one_line_error(err, "--no-resume")
    assert "resume=" not in err


# ----------------------------------------------------------------------------------------------------------------
# Training output

def small(out_dir, **kw):
    base = dict(epochs=1, batch_size=2, workers=0, backend="reference", log_every=1, lr_milestones=(2,))
    base.update(kw)
    return TrainConfig("gtpt-t", str(out_dir), **base)


def test_banner_numbering_and_labelled_loss_under_max_steps(tmp_path, capsys):
    summary = train(small(tmp_path, epochs=300, max_steps=1), SyntheticPoseDataset(4),
                    val_fn=lambda m, e: {"AP": 0.25}, device="cpu")
    out = capsys.readouterr().out
    assert summary["steps"] == 1
    assert "training 1 steps (--max-steps 1 of 300 epochs x 2 steps)" in out
    assert "300 epochs x 2 steps," not in out  # the banner does not promise 600 steps
    assert "epoch 1/300 step 1/2 (global 1): mean loss of the last 1 step " in out
    assert "val epoch 1/300 (stopped after step 1/2), EMA weights: AP 0.2500" in out
    assert "done: 1 steps" in out and "best AP 0.2500 (epoch 1)" in out


def test_interrupt_gives_the_command_then_epoch_1_of_1(tmp_path, capsys, monkeypatch):
    cfg = small(tmp_path)
    cmd = f"gtpt train --variant gtpt-t --output-dir {tmp_path}"
    with pytest.raises(KeyboardInterrupt):  # SIGTERM while loading step 2's batch
        train(cfg, SyntheticPoseDataset(4, sigterm_at=3), val_fn=lambda m, e: {"AP": 0.5}, device="cpu",
              resume_command=cmd)
    out = capsys.readouterr().out
    assert "epoch 1/1 step 1/2 (global 1): mean loss of the last 1 step" in out and ", ETA " in out
    assert f"interrupted in epoch 1/1 after step 1/2 (global step 1): saved {tmp_path}/last.pth. " \
           f"To continue, run again: {cmd}" in out
    assert "resume=True" not in out
    # resumed on a terminal: a tqdm bar with an ETA instead of step lines; the validation after --epochs 1 is
    # "val epoch 1/1"
    tty = type("TTY", (io.StringIO,), {"isatty": lambda self: True})()
    monkeypatch.setattr("sys.stderr", tty)
    monkeypatch.delenv("GTPT_NO_PROGRESS", raising=False)
    train(cfg, SyntheticPoseDataset(4), val_fn=lambda m, e: {"AP": 0.5}, device="cpu", resume_command=cmd)
    out = capsys.readouterr().out
    bar = tty.getvalue()
    assert re.search(r"2/2 \[[0-9:]+<[0-9:]+", bar), bar  # steps done/total [elapsed<remaining]
    assert "mean loss" in bar and "epoch 1/1" in bar
    assert "val epoch 1/1, EMA weights: AP 0.5000" in out
    assert "continuing: 1 of 1 epochs x 2 steps = 2 steps left" in out
    assert "epoch 1/1 step 2/2" not in out  # step lines go to log.jsonl only while the bar shows


def test_resume_command_drops_no_resume():
    assert T._resume_command("gtpt train", ["--output-dir", "a b", "--no-resume", "--epochs", "3"]) == \
        "gtpt train --output-dir 'a b' --epochs 3"


# ----------------------------------------------------------------------------------------------------------------
# Workers and help

def test_default_workers_fit_the_machine(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert default_workers() == 1
    assert TrainConfig("gtpt-t", str(tmp_path)).workers == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert default_workers() == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert default_workers() == 4


def test_help_describes_every_option_with_its_default(capsys):
    parser = build_arg_parser("gtpt train")
    flags = {a.dest: a for a in parser._actions if a.dest != "help"}
    import dataclasses
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= set(flags)  # one flag per config field
    for dest, action in flags.items():
        assert action.help and len(action.help) > 10, dest
        if dest not in ("output_dir", "train_ann_file", "train_image_root", "val_ann_file", "val_image_root",
                        "init_from", "variant"):
            assert "default" in action.help, dest
    with pytest.raises(SystemExit) as e:
        gtpt_main(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    text = " ".join(text.split())
    assert f"default 300; {T.SYNTH_DEFAULTS['epochs']} on the synthetic dataset" in text
    assert f"default on this machine: {default_workers()}" in text
