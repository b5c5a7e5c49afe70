"""Training loop: EMA, schedule, determinism, exact resume after SIGTERM, checkpoints, curriculum, AMP, DDP (gloo).

Runs gtpt-t on the reference backend with a synthetic dataset that follows the gtpt.data item contract, so it does
not depend on the data pipeline. One 4-step baseline run (2 epochs x 2 steps, batch 2) is shared by several tests.
"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from gtpt import CheckpointError, build_model, load_official_checkpoint
from gtpt.checkpoint import select_ema
from gtpt.loss import GlobalPerceivedLoss
from gtpt.profiler import interrupt_on_stop_signals
from gtpt.train import (ModelEMA, TrainConfig, TrainUsageError, _hold_stop_signals, advance_scheduler,
                        init_from_checkpoint, main, make_optimizer, make_scheduler, official_state_dict)
from gtpt.train import train as _train

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


class SyntheticPoseDataset(Dataset):
    """Items as gtpt.data produces them: random image, Gaussian SimCC targets (sigma 4 bins), some zero weights.
    Deterministic per (epoch, index). ``sigterm_at``: send this process SIGTERM on that __getitem__ call (1-based)."""

    def __init__(self, n=4, num_keypoints=17, sigterm_at=None):
        self.n, self.k, self.sigterm_at = n, num_keypoints, sigterm_at
        self.epoch, self.calls = 0, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.calls += 1
        if self.calls == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        g = torch.Generator().manual_seed(1000 * self.epoch + i)
        k = self.k

        def target(bins):
            mu = torch.rand(k, 1, generator=g) * bins
            t = torch.exp(-(torch.arange(bins, dtype=torch.float32) - mu) ** 2 / (2 * 4.0 ** 2))
            return t / t.sum(-1, keepdim=True)

        return {"image": torch.randn(3, 256, 192, generator=g), "target_x": target(384), "target_y": target(512),
                "target_weight": (torch.rand(k, generator=g) > 0.2).float(),
                "center": np.array([96.0, 128.0]), "scale": np.array([0.96, 1.28]), "rotation": 0.0, "score": 1.0,
                "area": 1000.0, "image_id": i, "index": i}


def train(cfg, dataset, **kw):
    """The training logic under test runs on the CPU on every machine: bitwise checks need deterministic kernels,
    and one GPU cannot host the two DDP ranks. ``test_gpu_triton_bf16_steps`` covers CUDA."""
    return _train(cfg, dataset, device="cpu", **kw)


def small_config(out_dir, **kw):
    base = dict(epochs=2, batch_size=2, workers=0, backend="reference", log_every=1, lr_milestones=(2,))
    base.update(kw)
    return TrainConfig("gtpt-t", str(out_dir), **base)


def tensors_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, one_thread):
    """4 uninterrupted steps with a val_fn; returns (output dir, summary, val_fn calls)."""
    out = tmp_path_factory.mktemp("baseline")
    calls = []

    def val_fn(model, epoch):
        calls.append((epoch, model.training))
        return {"AP": 0.5, "AR": 0.6}

    summary = train(small_config(out), SyntheticPoseDataset(), val_fn=val_fn)
    return str(out), summary, calls


# ----------------------------------------------------------------------------------------------------------------
# EMA and schedule

def test_ema_momentum_schedule_endpoints():
    ema = ModelEMA(nn.Linear(2, 2), base_momentum=0.996, total_steps=1000)
    assert ema.momentum(0) == pytest.approx(0.996, abs=1e-15)
    assert ema.momentum(500) == pytest.approx(0.998, abs=1e-15)
    assert ema.momentum(1000) == 1.0
    assert ema.momentum(5000) == 1.0  # held at 1 past T
    ms = [ema.momentum(t) for t in range(0, 1001, 50)]
    assert all(a < b for a, b in zip(ms, ms[1:]))
    # official cosine_scheduler(0.996, 1, epochs, niter, epoch, i) at one interior point
    epochs, niter, epoch, i = 300, 10, 123, 4
    t = epoch * niter + i
    official = 1 + 0.5 * (0.996 - 1) * (1 + math.cos(math.pi * t / (epochs * niter)))
    assert ModelEMA(nn.Linear(2, 2), 0.996, epochs * niter).momentum(t) == pytest.approx(official, abs=1e-15)


def test_ema_update_covers_buffers_and_unwraps_wrappers():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    ema = ModelEMA(nn.DataParallel(student), base_momentum=0.9, total_steps=10)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    student.train()
    student(torch.randn(2, 3, 8, 8))  # moves BN running stats and num_batches_tracked
    with torch.no_grad():
        student[0].weight.add_(1.0)
    now = {k: v.clone() for k, v in student.state_dict().items()}
    m = ema.update(nn.DataParallel(student), step=3)
    assert m == pytest.approx(ema.momentum(3))
    after = ema.state_dict()
    moved = [k for k, v in after.items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert moved == ["0.weight", "1.running_mean", "1.running_var"]  # what the student changed, BN stats included
    for k, v in after.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, m * before[k] + (1 - m) * now[k], rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(v, now[k]) and v.item() == 1, k  # num_batches_tracked copied


def test_scheduler_stepped_at_epoch_start_decays_one_epoch_early():
    cfg = TrainConfig("gtpt-t", "unused")
    model = nn.Linear(2, 2)
    opt = make_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["weight_decay"] == 0
    sched = make_scheduler(opt, cfg)
    lrs = []
    for epoch in range(cfg.epochs):
        advance_scheduler(sched, epoch)
        advance_scheduler(sched, epoch)  # idempotent (a resume inside the epoch)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == lrs[198] == 1e-3
    assert lrs[199] == pytest.approx(1e-4) and lrs[258] == pytest.approx(1e-4)  # milestone 200 -> epoch index 199
    assert lrs[259] == pytest.approx(1e-5) and lrs[299] == pytest.approx(1e-5)  # milestone 260 -> epoch index 259


def test_config_validation_and_round_trip():
    cfg = TrainConfig("GTPT_T", "out", lr_milestones=[5, 8], amp="bf16")
    assert cfg.variant == "gtpt-t" and cfg.lr_milestones == (5, 8)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    bad = [dict(epochs=0), dict(batch_size=2.0), dict(lr=-1.0), dict(lr=float("nan")), dict(lr_milestones=(5, 3)),
           dict(lr_gamma=0.0), dict(ema_momentum=1.5), dict(amp="fp8"), dict(backend="cuda"), dict(workers=-1),
           dict(max_steps=0), dict(grad_clip=0.0), dict(val_every=0), dict(train_ann_file="a.json"),
           dict(val_detections_file="d.json"), dict(resume="yes")]
    for kw in bad:
        with pytest.raises(ValueError, match="TrainConfig"):
            TrainConfig("gtpt-t", "out", **kw)
    with pytest.raises(ValueError, match="unknown GTPT variant"):
        TrainConfig("gtpt-xl", "out")


# ----------------------------------------------------------------------------------------------------------------
# Training runs

def test_every_trainable_parameter_gets_a_gradient(one_thread):
    """Why DDP runs with find_unused_parameters=False: both passes together use every parameter (body and WB)."""
    for variant, k in (("gtpt-t", 17), ("gtpt-t-wholebody", 133)):
        torch.manual_seed(0)
        model = build_model(variant, backend="reference").train()
        item = SyntheticPoseDataset(1, k)[0]
        batch = {key: item[key][None] for key in ("image", "target_x", "target_y", "target_weight")}
        batch["target_weight"] = torch.ones_like(batch["target_weight"])
        GlobalPerceivedLoss()(model(batch["image"]), batch["target_x"], batch["target_y"],
                              batch["target_weight"]).backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
        assert missing == [], variant


def test_training_steps_update_student_and_ema(baseline):
    out, summary, calls = baseline
    assert summary["steps"] == 4 and summary["steps_run"] == 4 and summary["epoch"] == 2
    assert math.isfinite(summary["final_loss"]) and summary["final_loss"] > 0
    assert summary["final_loss"] == pytest.approx(sum(summary["final_loss_parts"].values()), rel=1e-5)
    sd = torch.load(summary["final_checkpoint"], weights_only=True)
    student, ema = select_ema(sd, use_ema=False), select_ema(sd, use_ema=True)
    torch.manual_seed(42)  # train() seeds seed + rank before building: the same initial weights
    init = build_model("gtpt-t", backend="reference").state_dict()
    names = [n for n, p in build_model("gtpt-t").named_parameters() if p.requires_grad]
    for n in names:
        assert not torch.equal(student[n], init[n]), f"{n} not updated"
        assert not torch.equal(ema[n], student[n]) and not torch.equal(ema[n], init[n]), f"EMA of {n}"
    assert torch.equal(summary["model"].state_dict()["mlp_head_x.1.weight"], student["mlp_head_x.1.weight"])
    # the log: one line per step, lr decayed from the second epoch (milestone 2, stepped at epoch start)
    steps = [r for r in read_log(out) if r["event"] == "train"]
    assert [r["global_step"] for r in steps] == [1, 2, 3, 4]
    assert [r["lr"] for r in steps] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4])
    assert steps[0]["ema_momentum"] == pytest.approx(0.996)
    # val_fn ran once, at the end (epoch index 1), on the EMA model in eval mode; best.pth kept by "AP"
    assert calls == [(1, False)]
    assert summary["metrics"] == [{"epoch": 1, "global_step": 4, "AP": 0.5, "AR": 0.6}]
    assert summary["best"]["value"] == 0.5 and os.path.isfile(summary["best_checkpoint"])
    last = torch.load(summary["last_checkpoint"], weights_only=True)
    assert last["metrics"] == summary["metrics"] and (last["epoch"], last["step_in_epoch"]) == (2, 0)


def test_warmup_and_constant_ema(tmp_path, one_thread):
    """The synthetic-data recipe's options: a linear lr warm-up over the first steps (on top of the epoch's decayed
    lr) and an EMA momentum held at its start value; the official defaults (no warm-up, cosine) stay as they were."""
    assert (TrainConfig("gtpt-t", "x").warmup_steps, TrainConfig("gtpt-t", "x").ema_schedule) == (0, "cosine")
    assert ModelEMA(nn.Linear(2, 2), 0.9, 10, ramp=False).momentum(7) == 0.9
    summary = train(small_config(tmp_path, warmup_steps=3, ema_schedule="constant", ema_momentum=0.5),
                    SyntheticPoseDataset())
    steps = [r for r in read_log(tmp_path) if r["event"] == "train"]
    assert [r["lr"] for r in steps] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-4, 1e-4])
    assert [r["ema_momentum"] for r in steps] == [0.5] * 4 and summary["steps"] == 4
    for bad in ({"warmup_steps": -1}, {"ema_schedule": "linear"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig("gtpt-t", "x", **bad)


def test_same_seed_gives_bitwise_identical_weights(baseline, tmp_path):
    out, summary, _ = baseline
    again = train(small_config(tmp_path), SyntheticPoseDataset())
    assert again["final_loss"] == summary["final_loss"]
    assert tensors_equal(torch.load(again["final_checkpoint"], weights_only=True),
                         torch.load(summary["final_checkpoint"], weights_only=True))


def test_sigterm_saves_last_and_resume_is_exact(baseline, tmp_path):
    out, summary, _ = baseline
    cfg = small_config(tmp_path)
    # __getitem__ call 7 loads the first batch of step 4 (batch 2): SIGTERM lands inside epoch 1 after 3 steps
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, SyntheticPoseDataset(sigterm_at=7))
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
    state = torch.load(tmp_path / "last.pth", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 1, 3)
    assert [r["event"] for r in read_log(tmp_path)][-1] == "interrupt"
    resumed = train(cfg, SyntheticPoseDataset())
    assert resumed["resumed_from"] == str(tmp_path / "last.pth")
    assert resumed["steps_run"] == 1 and resumed["steps"] == 4
    assert resumed["final_loss"] == summary["final_loss"]
    assert tensors_equal(torch.load(resumed["final_checkpoint"], weights_only=True),
                         torch.load(summary["final_checkpoint"], weights_only=True))
    a = torch.load(resumed["last_checkpoint"], weights_only=True)["optimizer"]["state"]
    b = torch.load(summary["last_checkpoint"], weights_only=True)["optimizer"]["state"]
    assert all(torch.equal(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"]) for i in b)


def test_sigterm_at_the_epoch_boundary_does_not_skip_an_epoch(baseline, tmp_path):
    # SIGTERM delivered just after the epoch counter moves on, before the step counter is reset: the two must commit
    # together, or last.pth says (epoch 1, step 2 of 2) and the resumed run silently skips epoch 1.
    import gtpt.train as train_module
    out, summary, _ = baseline
    cfg = small_config(tmp_path)
    src = open(train_module.__file__).read().splitlines()
    line = next(i for i, text in enumerate(src, 1) if text.strip() == "self.step_in_epoch = 0")
    sent = []

    def tracer(frame, event, arg):
        if frame.f_code.co_name != "run" or frame.f_code.co_filename != train_module.__file__:
            return None

        def local(frame, event, arg):
            if event == "line" and frame.f_lineno == line and not sent:
                sent.append(1)
                os.kill(os.getpid(), signal.SIGTERM)
            return local
        return local
    sys.settrace(tracer)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg, SyntheticPoseDataset())
    finally:
        sys.settrace(None)
    assert sent
    state = torch.load(tmp_path / "last.pth", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 0, 2)
    resumed = train(cfg, SyntheticPoseDataset())
    assert resumed["steps_run"] == 2 and resumed["steps"] == 4
    assert tensors_equal(torch.load(resumed["final_checkpoint"], weights_only=True),
                         torch.load(summary["final_checkpoint"], weights_only=True))


def test_stop_signal_is_held_until_the_step_commits():
    with interrupt_on_stop_signals():
        done = []
        with pytest.raises(KeyboardInterrupt):
            with _hold_stop_signals():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.01)
                done.append("optimizer step, EMA update, counters")
        assert done  # the whole block ran before the interrupt surfaced


def test_corrupt_last_checkpoint_is_a_clear_error(baseline, tmp_path):
    out, _, _ = baseline
    path = tmp_path / "last.pth"
    data = open(os.path.join(out, "last.pth"), "rb").read()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="last.pth") as e:
        train(small_config(tmp_path), SyntheticPoseDataset())
    assert "move it away" in str(e.value)
    assert path.read_bytes() == data[: len(data) // 2]  # kept, not overwritten by a fresh run


def test_resume_refuses_another_variant_and_unwanted_overwrite(baseline, tmp_path):
    out, _, _ = baseline
    shutil.copy(os.path.join(out, "last.pth"), tmp_path / "last.pth")
    with pytest.raises(CheckpointError, match="gtpt-t run.*gtpt-s"):
        train(TrainConfig("gtpt-s", str(tmp_path), workers=0, backend="reference"), SyntheticPoseDataset())
    with pytest.raises(TrainUsageError, match="--no-resume"):
        train(small_config(tmp_path, resume=False), SyntheticPoseDataset())


def test_final_checkpoint_loads_as_official_ema(baseline):
    _, summary, _ = baseline
    path = summary["final_checkpoint"]
    sd = torch.load(path, weights_only=True)
    assert any(k.startswith("ema_features.") for k in sd) and any(k.startswith("features.") for k in sd)
    model = load_official_checkpoint(build_model("gtpt-t", backend="reference"), path)
    assert tensors_equal(model.state_dict(), summary["ema_model"].state_dict())
    student = load_official_checkpoint(build_model("gtpt-t", backend="reference"), path, use_ema=False)
    assert tensors_equal(student.state_dict(), summary["model"].state_dict())
    # our last.pth is read the same way (its "state_dict" holds the official layout)
    assert tensors_equal(load_official_checkpoint(build_model("gtpt-t"), summary["last_checkpoint"]).state_dict(),
                         model.state_dict())


# ----------------------------------------------------------------------------------------------------------------
# Curriculum, AMP

def test_curriculum_body_ema_initialises_wholebody(baseline, tmp_path):
    _, summary, _ = baseline
    body_ema = summary["ema_model"].state_dict()
    torch.manual_seed(1)
    wb = build_model("gtpt-t-wholebody", backend="reference")
    fresh = {k: v.clone() for k, v in wb.state_dict().items()}
    report = init_from_checkpoint(wb, summary["final_checkpoint"])
    wb_only = sorted(set(fresh) - set(body_ema))
    assert wb_only == ["features.extra_token", "features.fine_keypoint_token"]
    assert report["new"] == wb_only and report["ignored"] == [] and report["source"] == "ema"
    sd = wb.state_dict()
    assert all(torch.equal(sd[k], body_ema[k]) for k in body_ema)  # the EMA copy, not the student
    assert all(torch.equal(sd[k], fresh[k]) for k in wb_only)
    with pytest.raises(CheckpointError, match="differ in shape"):
        gtpt_s = build_model("gtpt-s")
        init_from_checkpoint(build_model("gtpt-t-wholebody"), official_state_dict(gtpt_s, gtpt_s))

    # through train(): one WholeBody step; the EMA started from the initialised student (re-copied)
    cfg = TrainConfig("gtpt-t-wholebody", str(tmp_path), epochs=1, batch_size=1, workers=0, backend="reference",
                      init_from=summary["final_checkpoint"], max_steps=1)
    run = train(cfg, SyntheticPoseDataset(2, num_keypoints=133))
    assert run["steps"] == 1 and run["init"]["new"] == wb_only and math.isfinite(run["final_loss"])
    student, ema = run["model"].state_dict(), run["ema_model"].state_dict()
    m = 0.996
    for k in ("features.keypoint_token", "mlp_head_y.1.bias", "features.transformer.layers.0.0.fn.fn.to_qkv.weight"):
        torch.testing.assert_close(ema[k], m * body_ema[k] + (1 - m) * student[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_step_on_cpu(amp, tmp_path, one_thread):
    """One autocast step with gradient clipping; fp16 goes through the GradScaler (scale, unscale, step, update)."""
    run = train(small_config(tmp_path, amp=amp, max_steps=1, grad_clip=1.0), SyntheticPoseDataset())
    assert run["steps"] == 1 and run["step_in_epoch"] == 1 and math.isfinite(run["final_loss"])
    assert all(p.dtype == torch.float32 for p in run["model"].parameters())
    torch.manual_seed(42)
    init = build_model("gtpt-t").state_dict()
    assert not torch.equal(run["model"].state_dict()["mlp_head_y.1.weight"], init["mlp_head_y.1.weight"])
    scaler = torch.load(tmp_path / "last.pth", weights_only=True)["scaler"]
    assert scaler == {} if amp == "bf16" else scaler["scale"] == 65536.0  # no overflow, so no step was skipped


# ----------------------------------------------------------------------------------------------------------------
# DDP on CPU (gloo), two processes through torchrun

DDP_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    sys.path.insert(0, {tests!r})
    from test_train import SyntheticPoseDataset
    from gtpt.train import TrainConfig, train
    torch.set_num_threads(1)
    out = sys.argv[1]
    cfg = TrainConfig("gtpt-t", os.path.join(out, "run"), epochs=1, batch_size=1, workers=0, backend="reference",
                      log_every=1)
    s = train(cfg, SyntheticPoseDataset(4), device="cpu")
    params = lambda m: {{n: p.detach() for n, p in m.named_parameters()}}
    torch.save({{"steps": s["steps"], "world_size": s["world_size"], "loss": s["final_loss"],
                "student": params(s["model"]), "ema": params(s["ema_model"])}},
               os.path.join(out, "rank%s.pth" % os.environ["RANK"]))
""")


def test_ddp_two_cpu_processes_end_identical(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT.format(tests=HERE))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pth", weights_only=True) for r in (0, 1))
    # 4 samples over 2 ranks x batch 1: 2 steps each; different data per rank, same weights after the all-reduce
    assert r0["steps"] == r1["steps"] == 2 and r0["world_size"] == 2
    assert r0["loss"] != r1["loss"]
    assert tensors_equal(r0["student"], r1["student"]) and tensors_equal(r0["ema"], r1["ema"])
    torch.manual_seed(42)
    init = dict(build_model("gtpt-t").named_parameters())
    assert not torch.equal(r0["student"]["mlp_head_x.1.weight"], init["mlp_head_x.1.weight"])
    assert os.path.isfile(tmp_path / "run" / "model_final.pth")  # rank 0 writes the checkpoints
    assert "(global 2)" in proc.stdout and proc.stdout.count("done:") == 1  # rank 0 logs alone


# ----------------------------------------------------------------------------------------------------------------
# Real data: coco_tiny through the command line (gtpt.data pipeline, one DataLoader worker, COCO validation)

def test_coco_tiny_two_steps_through_the_command_line(coco_tiny, tmp_path, one_thread):
    ann = os.path.join(coco_tiny, "annotations", "person_keypoints_tiny.json")
    images = os.path.join(coco_tiny, "images")
    rc = main(["--variant", "gtpt-t", "--output-dir", str(tmp_path), "--train-ann-file", ann, "--train-image-root",
               images, "--val-ann-file", ann, "--val-image-root", images, "--epochs", "3", "--batch-size", "2",
               "--max-steps", "2", "--workers", "1", "--backend", "reference", "--log-every", "1",
               "--lr-milestones", "2", "--device", "cpu"])
    assert rc == 0
    log = read_log(tmp_path)
    steps = [r for r in log if r["event"] == "train"]
    assert [r["global_step"] for r in steps] == [1, 2] and all(math.isfinite(r["loss"]) for r in steps)
    assert steps[0]["lr"] == pytest.approx(1e-3)
    val = [r for r in log if r["event"] == "val"]
    assert len(val) == 1 and val[0]["epoch"] == 0 and 0.0 <= val[0]["AP"] <= 1.0  # the stop inside epoch 0
    model = load_official_checkpoint(build_model("gtpt-t"), tmp_path / "model_final.pth")
    state = torch.load(tmp_path / "last.pth", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["config"]["train_ann_file"]) == (0, 2, ann)
    assert tensors_equal(model.state_dict(), select_ema(state["state_dict"]))


# ----------------------------------------------------------------------------------------------------------------
# GPU: the fused kernels in a real training step

@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["gtpt-t", "gtpt-s-wholebody"])
def test_gpu_triton_bf16_steps(variant, tmp_path):
    """Three bf16-autocast steps on CUDA with every attention and pruning op on the Triton kernels: finite losses,
    parameters updated, and a first-step loss close to the reference backend's from the same weights and batch."""
    k = 133 if variant.endswith("wholebody") else 17
    runs = {}
    for backend in ("triton", "reference"):
        cfg = TrainConfig(variant, str(tmp_path / backend), epochs=1, batch_size=4, workers=0, backend=backend,
                          amp="bf16", log_every=1, max_steps=3)
        runs[backend] = _train(cfg, SyntheticPoseDataset(12, num_keypoints=k), device="cuda")
    log = {b: [r for r in read_log(tmp_path / b) if r["event"] == "train"] for b in runs}
    assert all(math.isfinite(r["loss"]) for r in log["triton"]) and runs["triton"]["steps"] == 3
    assert log["triton"][0]["loss"] == pytest.approx(log["reference"][0]["loss"], rel=2e-2)
    torch.manual_seed(42)
    init = build_model(variant).state_dict()
    trained = runs["triton"]["model"].state_dict()
    assert not torch.equal(trained["mlp_head_x.1.weight"].cpu(), init["mlp_head_x.1.weight"])


def test_init_joint_tokens_redraws_only_the_joint_tokens():
    """--joint-token-std: keypoint, part and dense WholeBody tokens re-drawn at that std (cut at 2 std); the human
    token and every other weight untouched; same seed, same tokens; bad values are a TrainConfig error."""
    from gtpt.train import init_joint_tokens
    torch.manual_seed(0)
    m = build_model("gtpt-t-wholebody")
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    torch.manual_seed(5)
    init_joint_tokens(m, 1.0)
    joint = {"features.keypoint_token", "features.extra_token", "features.fine_keypoint_token"}
    for n, p in m.named_parameters():
        if n in joint:
            assert not torch.equal(p, before[n]) and p.abs().max() <= 2.0 and 0.5 < p.std() < 1.5, n
        else:
            assert torch.equal(p, before[n]), n
    again = build_model("gtpt-t-wholebody")
    torch.manual_seed(5)
    init_joint_tokens(again, 1.0)
    assert torch.equal(again.features.keypoint_token, m.features.keypoint_token)
    assert TrainConfig("gtpt-t", "x").joint_token_std is None
    for bad in (0, -1.0, float("nan"), "1"):
        with pytest.raises(ValueError, match="joint_token_std"):
            TrainConfig("gtpt-t", "x", joint_token_std=bad)
