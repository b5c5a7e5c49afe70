"""The GPU session script (benchmarks/run_gpu.sh -> gpu_session.py) on a CPU: a stand-in nvidia-smi and fake stages,
one of which overruns its slot and one of which ignores SIGTERM, run through the real script. Each stage must end
by its deadline plus the SIGKILL grace, later stages must still run, and the bundle must hold every stage's partial
output and a summary of what ran and what was cut (issue 13). Also: the built-in plan's priority order, the pytest
runner's stop on SIGTERM, and `gtpt train` ending promptly on SIGTERM inside a caller that asked for it."""
import json
import os
import signal
import stat
import subprocess
import sys
import tarfile
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")

QUICK = "open('{dir}/quick.txt', 'w').write('done')"
# writes a partial result, handles SIGTERM by noting it and exiting 3; would run 1000 s
OVERRUN = textwrap.dedent("""
    import signal, sys, time
    open('{dir}/partial.txt', 'w').write('case 1 measured')
    def stop(*a):
        open('{dir}/partial.txt', 'a').write('; SIGTERM: tables written')
        sys.exit(3)
    signal.signal(signal.SIGTERM, stop)
    time.sleep(1000)""")
# ignores SIGTERM and leaves a grandchild in its process group: only the group's SIGKILL ends them
STUBBORN = textwrap.dedent("""
    import signal, subprocess, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    p = subprocess.Popen(['sleep', '1000'])
    open('{dir}/grandchild.pid', 'w').write(str(p.pid))
    open('{dir}/partial.txt', 'w').write('half')
    time.sleep(1000)""")


def _stand_in_gpu(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text('#!/bin/sh\necho "NVIDIA H200 (stand-in), 580.00, 143771 MiB, 1980 MHz, 345 MHz"\n')
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def _env(tmp_path, **kw):
    path = f"{_stand_in_gpu(tmp_path)}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}"
    (tmp_path / "nowheels").mkdir(exist_ok=True)
    env = dict(os.environ, PATH=path, GPU_WHEELS_DIR=str(tmp_path / "nowheels"), GTPT_COMMIT="abc123")
    env.pop("GPU_T0", None)
    env.update(kw)
    return env


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) counts as ended
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def test_time_boxes_hold_and_the_bundle_says_what_ran(tmp_path):
    py = sys.executable
    plan = [{"name": "quick", "share": 2, "cmds": [[py, "-c", QUICK]]},
            {"name": "overrun", "share": 3, "cmds": [[py, "-c", OVERRUN]]},
            {"name": "stubborn", "share": 3, "cmds": [[py, "-c", STUBBORN]]},
            {"name": "after", "share": 3, "cmds": [[py, "-c", QUICK], [py, "-c", "import sys; sys.exit(4)"]]}]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    out = tmp_path / "out"
    out.mkdir()
    budget, kill_after = 24, 2
    env = _env(tmp_path, OUT=str(out), GPU_BUDGET_S=str(budget), GPU_KILL_AFTER_S=str(kill_after))
    t0 = time.time()
    proc = subprocess.run(["bash", os.path.join(BENCH, "run_gpu.sh"), "--plan", str(tmp_path / "plan.json")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=budget + 60)
    wall = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert wall <= budget + 10, wall

    # at most 8 files come back from the device machine
    assert sorted(os.listdir(out)) == ["gpu-results.tar.gz", "run.log", "summary.json", "summary.md"]
    summary = json.loads((out / "summary.json").read_text())
    st = {s["stage"]: s for s in summary["stages"]}
    assert list(st) == ["quick", "overrun", "stubborn", "after"]
    assert [st[s]["status"] for s in st] == ["ok", "cut", "cut", "failed"]
    for s in st.values():  # every stage started and ended inside its slot (deadline + SIGKILL grace), with slack
        assert s["cmds"] and all("started_s" in c for c in s["cmds"])
        for c in s["cmds"]:
            assert c["ended_s"] <= c["deadline_s"] + kill_after + 1.5, (s["stage"], c)
        assert s["ended_s"] <= s["started_s"] + s["slot_s"] + 1.5, s
    over, stub = st["overrun"]["cmds"][0], st["stubborn"]["cmds"][0]
    assert "sigterm_s" in over and "sigkill_s" not in over and over["rc"] == 3
    assert "sigterm_s" in stub and "sigkill_s" in stub and "ignored SIGTERM" in stub["note"]
    assert st["after"]["cmds"][0]["status"] == "ok" and st["after"]["cmds"][1]["note"] == "exit 4"
    assert st["after"]["started_s"] >= stub["ended_s"]  # the next stage waited for the kill, and still ran

    md = (out / "summary.md").read_text()
    assert "| overrun | cut |" in md and "SIGTERM at its deadline" in md and "SIGKILL" in md
    assert "GPU_BUDGET_S=240 bash benchmarks/run_gpu.sh overrun stubborn after" in md  # the rerun call

    with tarfile.open(out / "gpu-results.tar.gz") as tar:
        names = tar.getnames()
        date = names[0].split("/")[0]
        read = lambda n: tar.extractfile(f"{date}/{n}").read().decode()  # noqa: E731
        assert read("overrun/partial.txt") == "case 1 measured; SIGTERM: tables written"
        assert read("stubborn/partial.txt") == "half"
        assert read("after/cmd0/quick.txt") == "done"
        assert "NVIDIA H200 (stand-in)" in read("environment.txt") and "commit: abc123" in read("environment.txt")
        assert json.loads(read("summary.json"))["stages"][2]["status"] == "cut"
        assert "=== stage after" in read("run.log")
        grandchild = int(read("stubborn/grandchild.pid"))
    assert all(n.split("/")[0] == date for n in names)  # one top folder: tar -xzf ... -C benchmarks/results
    assert not _alive(grandchild)  # the whole process group went


def test_rerun_failed_selects_the_cut_and_failed_stages(tmp_path):
    summary = {"stages": [{"stage": "tests", "status": "ok"}, {"stage": "attention", "status": "cut"},
                          {"stage": "model", "status": "failed"}, {"stage": "ops", "status": "ok"}]}
    (tmp_path / "s.json").write_text(json.dumps(summary))
    p = subprocess.run([sys.executable, os.path.join(BENCH, "gpu_session.py"), "--dry-run", "--rerun-failed",
                        str(tmp_path / "s.json")], cwd=ROOT, env=_env(tmp_path, GPU_BUDGET_S="240"),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    stages = [ln.split()[0] for ln in p.stdout.splitlines() if " slot " in ln]
    assert stages == ["attention", "model"]
    bad = subprocess.run([sys.executable, os.path.join(BENCH, "gpu_session.py"), "--dry-run", "nosuch"], cwd=ROOT,
                         env=_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown stage(s) nosuch" in bad.stderr and "Traceback" not in bad.stderr


def test_builtin_plan_is_in_priority_order_and_fits():
    sys.path.insert(0, BENCH)
    try:
        import gpu_session
    finally:
        sys.path.remove(BENCH)
    plan = gpu_session.builtin_plan("python3")
    assert [s.name for s in plan] == ["tests", "attention", "prune", "model", "calibration", "train", "ops", "rest"]
    argv = {s.name: [c.argv("D", 50.0) for c in s.cmds] for s in plan}
    (tests,) = argv["tests"]
    assert "--continue-on-collection-errors" in tests and "--junitxml=D/junit.xml" in tests
    assert plan[0].cmds[0].env["GTPT_PYTEST_SELECT"].startswith("test_group_attention.py,test_token_prune.py")
    (attn,) = argv["attention"]
    assert attn[attn.index("--dtype") + 1:attn.index("--impls")] == ["bf16"]
    assert attn[attn.index("--batch") + 1:attn.index("--batch") + 3] == ["128", "32"]
    assert {"fused", "eager", "sdpa", "flex"} <= set(attn) and "compiled" not in attn
    (model,) = argv["model"]
    assert {"reference", "triton", "cudagraph", "compile-reduce-overhead"} <= set(model)
    # every benchmark stops starting cases well before its SIGTERM (the runner passes this as --budget-s)
    assert gpu_session._inner_budget(50.0) <= 42 and gpu_session._inner_budget(10.0) <= 8
    # the default budget leaves room for the tool's transfers in an 8-minute call
    assert gpu_session.DEFAULT_BUDGET_S + 60 <= 480


def test_pytest_runner_stops_even_when_the_test_swallows_sigterm(tmp_path):
    # an in-process `gtpt profile` turns the interrupt into "write the report, return": the session must stop anyway
    (tmp_path / "test_swallow.py").write_text(textwrap.dedent("""
        import os, signal, time
        def test_first():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            except KeyboardInterrupt:
                pass  # swallowed, as a sweep that writes its tables would
        def test_second():
            open(os.environ["MARK"], "w").write("ran")
    """))
    t0 = time.time()
    p = subprocess.run([sys.executable, os.path.join(BENCH, "gpu_pytest.py"), str(tmp_path), "-p", "no:cacheprovider",
                        f"--junitxml={tmp_path}/j.xml", "-q"], cwd=tmp_path,
                       env=dict(os.environ, MARK=str(tmp_path / "mark")), capture_output=True, text=True, timeout=60)
    assert time.time() - t0 < 30
    assert p.returncode == 2 and "stopped by SIGTERM" in p.stdout, p.stdout
    assert not (tmp_path / "mark").exists() and (tmp_path / "j.xml").exists()


class _SigtermDataset:
    def __len__(self):
        return 4

    def __getitem__(self, i):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM should have interrupted")


def test_gtpt_train_main_hands_sigterm_back_to_its_caller(tmp_path, monkeypatch):
    """A SIGTERM inside an in-process `gtpt train` (a CLI test under a time-boxed pytest) saves last.pth and then
    reaches the caller's SIGTERM handler, instead of `return 130` letting the caller run on past its deadline."""
    import gtpt.train as train_module
    monkeypatch.setattr(train_module, "_default_train_dataset", lambda cfg: _SigtermDataset())
    args = ["--variant", "gtpt-t", "--output-dir", str(tmp_path), "--epochs", "1", "--batch-size", "2",
            "--workers", "0", "--backend", "reference", "--device", "cpu"]
    seen = []

    def callers_handler(signum, frame):
        seen.append(signum)
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, callers_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            train_module.main(args)
        assert seen == [signal.SIGTERM] and (tmp_path / "last.pth").exists()
        assert signal.getsignal(signal.SIGTERM) is callers_handler
        # a caller that ignores SIGTERM gets the old behaviour: exit code 130
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        assert train_module.main(args) == 130
    finally:
        signal.signal(signal.SIGTERM, before)


def test_pytest_runner_selects_kernel_files_and_gpu_marked_tests(tmp_path):
    (tmp_path / "test_kernel_a.py").write_text("def test_one():\n    pass\n")
    (tmp_path / "test_other.py").write_text("import pytest\n\ndef test_cpu_only():\n    pass\n\n"
                                            "@pytest.mark.gpu\ndef test_on_gpu():\n    pass\n")
    p = subprocess.run([sys.executable, os.path.join(BENCH, "gpu_pytest.py"), str(tmp_path), "-p", "no:cacheprovider",
                        "--collect-only", "-q", "-W", "ignore::pytest.PytestUnknownMarkWarning"], cwd=ROOT,
                       env=dict(os.environ, GTPT_PYTEST_SELECT="test_kernel_a.py", PYTHONPATH=ROOT),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    ids = [ln for ln in p.stdout.splitlines() if "::" in ln]
    assert sorted(i.split("::")[1] for i in ids) == ["test_on_gpu", "test_one"]
    assert "2/3 tests collected (1 deselected)" in p.stdout


def test_calibration_joins_static_records_to_measured_kernels():
    sys.path.insert(0, BENCH)
    try:
        import run_calibration as cal
    finally:
        sys.path.remove(BENCH)
    fine = dict(op="mhga", shape="fine", variant="gtpt-s", batch=128, dtype="bf16", estimate_us=40.0,
                floor_us_h100=10.0, problem={"G": 3, "N": 82, "S": 6}, constexprs={"HEAD_DIM": 24, "PAD_TOKEN": True})
    recs = [dict(fine, kernel="_mhga_fwd_kernel"), dict(fine, kernel="_mhga_bwd_dkdv_kernel"),
            dict(op="prune", kernel="_prune_kernel", shape="fine_entry", variant="gtpt-s-wholebody", batch=32,
                 dtype="bf16", problem={"G": 3, "N": 179, "K": 122}),  # WholeBody keeps more: not the body site
            dict(op="prune", kernel="_prune_kernel", shape="fine_l3", variant="gtpt-s", batch=32, dtype="bf16",
                 estimate_us=20.0, problem={"G": 3, "N": 76, "K": 25})]
    keys = cal.groups_in_order(recs)
    geom = ("mhga", ("mhga_shape", 3, 82, 6, True, 8, 192), 128, "bf16")
    assert keys == [geom, ("prune", "fine_L3", 32, "bf16")]
    measured = {geom: {"_mhga_fwd_kernel": {"warm_us": 50.0, "flushed_us": 60.0},
                       "_mhga_bwd_dq_kernel": {"warm_us": 70.0}, "_mhga_bwd_dkdv_kernel": {"warm_us": 90.0}}}
    rows = cal.build_rows(recs, measured, {("prune", "fine_L3", 32, "bf16"): "not run: time budget of 5 s spent"})
    assert rows[0]["measured_kernel"] == "_mhga_fwd_kernel" and rows[0]["measured_over_estimate"] == 1.25
    assert rows[0]["measured_flushed_us"] == 60.0 and rows[0]["measured_over_floor_h100"] == 5.0
    assert rows[1]["measured_kernel"] == "_mhga_bwd_dkdv_kernel" and rows[1]["measured_us"] == 90.0
    assert rows[2]["measured_us"] is None and "the record's launch" in rows[2]["note"]
    assert rows[3]["note"].startswith("not run: time budget")
    # by role when a rewrite renames a kernel
    assert cal.match_kernel("_mhga_bwd_dk_dv_split_kernel", measured[geom]) == "_mhga_bwd_dkdv_kernel"
    md = cal.to_markdown(rows, {}, "test")
    assert "| mhga | _mhga_fwd_kernel | fine | gtpt-s | 128 | bf16 | 40.0 | 10.0 | 50.0 | 60.0 | 1.25 | 5.00 |" in md


def test_summary_reads_what_each_benchmark_measured_and_cut(tmp_path):
    sys.path.insert(0, BENCH)
    try:
        import gpu_session
    finally:
        sys.path.remove(BENCH)
    (tmp_path / "group_attention.json").write_text(json.dumps({"results": [
        dict(shape="teacher", B=128, dtype="bf16", mode="fwd", impl="fused", ms=0.1),
        dict(shape="teacher", B=128, dtype="bf16", mode="fwd", impl="flex", error="not run: interrupted")]}))
    (tmp_path / "profile.json").write_text(json.dumps({"latency": [
        dict(backend="triton", mode="inference", path="pruned", batch_size=32, dtype="bf16", status="ok"),
        dict(backend="compile-reduce-overhead", mode="inference", path="pruned", batch_size=128, dtype="bf16",
             status="skipped", note="time budget of 60 s spent")]}))
    d = gpu_session.details("bench", str(tmp_path))
    assert d["group_attention.json"]["ran"] == 1 and d["group_attention.json"]["not_run_cases"] == [
        "teacher B=128 bf16 fwd flex: not run: interrupted"]
    assert d["profile.json"]["not_run_cases"] == [
        "compile-reduce-overhead inference pruned B=128 bf16: skipped: time budget of 60 s spent"]
    (tmp_path / "junit.xml").write_text('<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
                                        '<testcase classname="t" name="a"><failure/></testcase></testsuite>'
                                        '</testsuites>')
    j = gpu_session.details("pytest", str(tmp_path))["tests"]
    assert (j["passed"], j["failures"], j["skipped"], j["failed_tests"]) == (1, 1, 1, ["t::a"])
    summary = {"label": "x", "started": "now", "budget_s": 100, "elapsed_s": 1.0, "stages_planned": ["attention"],
               "stages": [{"stage": "attention", "status": "cut", "slot_s": 10, "started_s": 1, "ended_s": 11,
                           "deadline_s": 6, "cmds": [{"cmd": "mhga", "status": "cut", "note": "SIGTERM at its deadline",
                                                      "details": d}]}]}
    md = gpu_session.summary_markdown(summary)
    assert "mhga: 1 cases" in md and "teacher B=128 bf16 fwd flex: not run: interrupted" in md
