#!/usr/bin/env python3
"""One time-boxed GPU session: every headline figure in priority order, each stage in a hard time box.

Started by ``benchmarks/run_gpu.sh`` (which installs the carried wheels first); see that script's header and the
README's GPU section for the two calls (preflight here, the GPU call there) and the unpack step.

Stages, most important first (issue 13):

 1. ``tests``       GPU correctness of both kernels: the kernel test files and every gpu-marked test
 2. ``attention``   MHGA fwd and fwd+bwd at the four GTPT shapes, bf16, B = 128 then 32: fused vs eager,
                    concat + SDPA, compiled FlexAttention; L2-flushed and L2-warm times
 3. ``prune``       the pruning sites, bf16, B = 128 and 32, fused vs the official eager sequence
 4. ``model``       GTPT-S bf16 B = 32 and 128 end to end: reference eager, fused eager, fused + CUDA graphs,
                    ``torch.compile(mode="reduce-overhead")`` of the reference
 5. ``calibration`` each kernel config's static estimate (``benchmarks/static_cost.py``) beside its measured time
 6. ``train``       one training step (both passes), fused vs reference, with peak memory
 7. ``ops``         the op breakdown (kernel time by category), inference and a training step
 8. ``rest``        fp32, the compiled baselines of attention / pruning, WholeBody, the other model backends and
                    the whole test suite

Time: ``GPU_BUDGET_S`` (default 420 s) bounds the session from the start of ``run_gpu.sh`` (``GPU_T0``). When a
stage starts, ``MIN_SLOT_S`` (10 s) is set aside for it and each later stage, and it gets that plus the rest of the
time left times its share over the shares of the stages still to run: time a stage does not use flows to all later
ones, and with a short budget every stage still starts. Each command runs in its own process group and gets SIGTERM at its deadline (the
benchmark scripts then write their tables, pytest its summary and junit file) and SIGKILL ``KILL_AFTER_S`` later;
the deadline is set that much before the end of the stage's slot, so no stage ever takes time from the next. The
benchmark scripts are also given ``--budget-s`` (stop starting cases) a little before the deadline.

Results: every stage writes into its own folder; after every stage ``summary.json`` / ``summary.md`` (per stage:
slot, what ran, what was cut and why) are rewritten and everything is bundled into ``gpu-results.tar.gz``, whose
single top folder (``<date>/``, a rerun ``<date>/rerun-<time>/``) unpacks into ``benchmarks/results/``. On the
device machine (``$OUT`` set) four files come back: ``gpu-results.tar.gz``, ``summary.md``, ``summary.json`` and
``run.log``.

``--rerun-failed SUMMARY.json`` runs again only the stages that were cut or failed in that summary; stage names
as arguments (or ``STAGES="a b"``) run just those. ``--dry-run`` prints the plan and exits. ``--plan FILE`` replaces
the built-in stages by a JSON list ``[{"name", "share", "cmds": [[argv...], ...]}]`` (``{dir}`` and ``{budget_s}``
in an argument are replaced by the command's output folder and inner budget): the CI test's fake stages.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BUDGET_S = 420.0
# SIGTERM at the deadline, SIGKILL this much later (the end of the stage's slot); GPU_KILL_AFTER_S overrides it
def _env_seconds(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name) or default)
    except ValueError:
        sys.exit(f"{name}={os.environ[name]!r} is not a number of seconds")


KILL_AFTER_S = _env_seconds("GPU_KILL_AFTER_S", 5.0)
# Every stage (and the first command of a multi-command stage) gets at least this long when the budget allows: with
# a short budget every stage still starts, and reports what it managed.
MIN_SLOT_S = 2 * KILL_AFTER_S
POLL_S = 0.2
BUNDLE = "gpu-results.tar.gz"


# ----------------------------------------------------------------------------------------------------------------
# The plan

@dataclass
class Cmd:
    name: str
    argv: Callable[[str, float], List[str]]  # (output folder, inner budget s) -> argv
    env: Dict[str, str] = field(default_factory=dict)
    kind: str = "bench"                      # pytest / bench / profile / calibration / fake: how to read its output


@dataclass
class Stage:
    name: str
    share: float
    what: str
    cmds: List[Cmd]


def _inner_budget(seconds: float) -> float:
    """--budget-s for a benchmark given `seconds` until its SIGTERM: stop starting cases early enough that the case
    in flight (a compile takes tens of seconds) usually ends and the tables are written before the deadline."""
    return max(1.0, min(seconds - 8.0, seconds * 0.8))


def slot_for(left: float, shares: List[float]) -> float:
    """The slot of the first of the stages still to run, given ``left`` seconds and their shares: ``MIN_SLOT_S``
    each is set aside first (or an equal part, if there is not that much), the rest is split by share."""
    n = len(shares)
    if left <= MIN_SLOT_S * n:
        return max(0.0, left / n)
    return MIN_SLOT_S + (left - MIN_SLOT_S * n) * shares[0] / sum(shares)


def _b(x: float) -> str:
    return f"{x:.0f}"


# The kernel test files (both kernels, the direct launches, fused-vs-reference model parity); the gpu-marked tests of
# the other files are added by the plug-in's selection.
KERNEL_TEST_FILES = ("test_group_attention.py", "test_token_prune.py", "test_direct_launch.py",
                     "test_model_triton.py", "test_testing.py")
ATTN_SHAPES = ["coco_fine", "teacher", "coarse", "coco_fine_late"]  # the four GTPT shapes
ALL_ATTN_SHAPES = ATTN_SHAPES + ["wholebody_fine"]
PRUNE_SITES = ["fine_L3", "fine_entry", "coarse_L3", "fine_L3_wholebody"]


def _have(module: str, py: str) -> bool:
    try:
        return subprocess.run([py, "-c", f"import {module}"], capture_output=True, timeout=60).returncode == 0
    except Exception:
        return False


def builtin_plan(py: str, xdist: bool = False, pytest_timeout: bool = False) -> List[Stage]:
    bench = lambda script: [py, os.path.join("benchmarks", script)]  # noqa: E731
    profile = [py, "-m", "gtpt", "profile", "--device", "cuda", "--variants", "gtpt-s", "--no-flops"]

    def pytest_argv(selected: bool):
        def argv(d, budget):
            a = [py, os.path.join("benchmarks", "gpu_pytest.py"), "tests", "-v", "-rs", "-p", "no:cacheprovider",
                 "--continue-on-collection-errors", "--durations=15", f"--junitxml={d}/junit.xml",
                 "--ignore=tests/test_kernels_compile.py"]
            if xdist:
                a += ["-n", "8"]
            if pytest_timeout:
                a += ["--timeout=120"]
            return a
        env = {"GTPT_NO_INTERPRET": "1"}
        if selected:
            env["GTPT_PYTEST_SELECT"] = ",".join(KERNEL_TEST_FILES)
        return argv, env

    tests_argv, tests_env = pytest_argv(True)
    suite_argv, suite_env = pytest_argv(False)
    return [
        Stage("tests", 14, "GPU correctness of both kernels: kernel test files + gpu-marked tests",
              [Cmd("pytest", tests_argv, tests_env, "pytest")]),
        Stage("attention", 26, "MHGA fwd, fwd+bwd, 4 GTPT shapes, bf16, B=128 then 32: fused vs eager, SDPA, flex",
              [Cmd("mhga", lambda d, b: bench("run_group_attention.py") + [
                  "--out-dir", d, "--shapes", *ATTN_SHAPES, "--batch", "128", "32", "--dtype", "bf16",
                  "--impls", "fused", "eager", "sdpa", "flex", "--modes", "fwd", "fwd+bwd", "--budget-s", _b(b)])]),
        Stage("prune", 6, "pruning sites, bf16, B=128 and 32: fused vs the official eager sequence",
              [Cmd("prune", lambda d, b: bench("run_token_prune.py") + [
                  "--out-dir", d, "--sites", *PRUNE_SITES, "--batch", "128", "32", "--dtype", "bf16",
                  "--compile-mode", "none", "--budget-s", _b(b)])]),
        Stage("model", 22, "GTPT-S bf16 B=32, 128 end to end: reference, fused, fused + CUDA graphs, "
                           "compile(reduce-overhead) of the reference",
              [Cmd("profile", lambda d, b: profile + [
                  "--batch-sizes", "32", "128", "--dtypes", "bf16", "--backends", "reference", "triton",
                  "cudagraph", "compile-reduce-overhead", "--modes", "inference", "--paths", "pruned",
                  "--repeats", "20", "--warmup", "3", "--budget-s", _b(b), "--out-dir", d], kind="profile")]),
        Stage("calibration", 7, "each kernel config: static estimate (benchmarks/static_cost.py) vs measured time",
              [Cmd("calibration", lambda d, b: bench("run_calibration.py") + [
                  "--out-dir", d, "--budget-s", _b(b)], kind="calibration")]),
        Stage("train", 6, "one training step (both passes), GTPT-S bf16 B=32: fused vs reference, peak memory",
              [Cmd("profile", lambda d, b: profile + [
                  "--batch-sizes", "32", "--dtypes", "bf16", "--backends", "triton", "reference", "--modes", "train",
                  "--no-stages", "--repeats", "10", "--warmup", "3", "--budget-s", _b(b), "--out-dir", d],
                  kind="profile")]),
        Stage("ops", 6, "op breakdown, GTPT-S bf16 B=128, fused and reference, inference and a training step",
              [Cmd("profile", lambda d, b: profile + [
                  "--batch-sizes", "128", "--dtypes", "bf16", "--backends", "triton", "reference",
                  "--modes", "inference", "train", "--paths", "pruned", "unpruned", "--no-stages", "--op-breakdown",
                  "--repeats", "5", "--warmup", "2", "--budget-s", _b(b), "--out-dir", d], kind="profile")]),
        Stage("rest", 13, "fp32, compiled baselines, WholeBody, other model backends, the whole test suite",
              [Cmd("prune_all", lambda d, b: bench("run_token_prune.py") + [
                  "--out-dir", d, "--sites", *PRUNE_SITES, "--batch", "128", "32", "--dtype", "bf16", "fp32",
                  "--compile-mode", "default", "--budget-s", _b(b)]),
               Cmd("mhga_wholebody_bf16", lambda d, b: bench("run_group_attention.py") + [
                   "--out-dir", d, "--shapes", "wholebody_fine", "--batch", "128", "32", "--dtype", "bf16",
                   "--impls", "fused", "eager", "sdpa", "flex", "compiled", "--budget-s", _b(b)]),
               Cmd("mhga_fp32", lambda d, b: bench("run_group_attention.py") + [
                   "--out-dir", d, "--shapes", *ALL_ATTN_SHAPES, "--batch", "128", "32", "--dtype", "fp32",
                   "--impls", "fused", "eager", "sdpa", "flex", "compiled", "--budget-s", _b(b)]),
               Cmd("model_more", lambda d, b: profile + [
                   "--batch-sizes", "32", "128", "--dtypes", "bf16", "fp32", "--backends", "triton", "reference",
                   "cudagraph", "cudagraph-reference", "compile-triton-reduce-overhead", "--modes", "inference",
                   "--paths", "pruned", "--no-stages", "--repeats", "20", "--warmup", "3", "--budget-s", _b(b),
                   "--out-dir", d], kind="profile"),
               Cmd("suite", suite_argv, suite_env, "pytest")]),
    ]


def plan_from_file(path: str) -> List[Stage]:
    with open(path) as f:
        spec = json.load(f)

    def argv_of(template):
        return lambda d, b: [a.replace("{dir}", d).replace("{budget_s}", _b(b)) for a in template]
    stages = []
    for s in spec:
        cmds = [Cmd(f"cmd{i}" if len(s["cmds"]) > 1 else s["name"], argv_of(c), kind="fake")
                for i, c in enumerate(s["cmds"])]
        stages.append(Stage(s["name"], float(s.get("share", 1)), s.get("what", ""), cmds))
    return stages


# ----------------------------------------------------------------------------------------------------------------
# Running one command in a time box

class Session:
    def __init__(self, base: str, out: Optional[str], label: str, t0: float, budget_s: float):
        self.base, self.out, self.label, self.t0, self.budget_s = base, out, label, t0, budget_s
        self.res = os.path.join(base, label)
        self.end = t0 + budget_s
        self.current: Optional[subprocess.Popen] = None
        self.stopping: Optional[str] = None

    def now(self) -> float:
        return time.time() - self.t0

    def say(self, msg: str) -> None:
        print(msg, flush=True)

    def run_cmd(self, cmd: Cmd, folder: str, deadline: float) -> dict:
        """Run ``cmd`` until it exits or ``deadline`` (absolute time): SIGTERM to its process group then, and SIGKILL
        ``KILL_AFTER_S`` later. Output goes to ``folder/output.log`` and is echoed with a prefix."""
        os.makedirs(folder, exist_ok=True)
        until = deadline - time.time()
        argv = cmd.argv(folder, _inner_budget(until))
        rec = {"cmd": cmd.name, "argv": argv, "started_s": round(self.now(), 1),
               "deadline_s": round(deadline - self.t0, 1), "kill_s": round(deadline + KILL_AFTER_S - self.t0, 1)}
        logpath = os.path.join(folder, "output.log")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **cmd.env)
        with open(logpath, "wb") as logf:
            logf.write(("$ " + " ".join(argv) + "\n").encode())
            logf.flush()
            try:
                proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
            except OSError as e:
                rec.update(status="failed", rc=None, note=f"could not start: {e}", ended_s=round(self.now(), 1))
                return rec
        self.current = proc
        termed_at = None
        with open(logpath, "rb") as tail:
            tail.seek(0, os.SEEK_END)
            while True:
                rc = proc.poll()
                self._echo(tail, cmd.name)
                if rc is not None:
                    break
                t = time.time()
                if termed_at is None and (t >= deadline or self.stopping):
                    termed_at = t
                    self._signal_group(proc, signal.SIGTERM)
                    rec["sigterm_s"] = round(t - self.t0, 1)
                elif termed_at is not None and t >= termed_at + KILL_AFTER_S:
                    self._signal_group(proc, signal.SIGKILL)
                    rec["sigkill_s"] = round(t - self.t0, 1)
                    proc.wait()
                    break
                time.sleep(POLL_S)
            # The leader may have exited before its children: the group goes with it.
            self._signal_group(proc, signal.SIGKILL)
            self._echo(tail, cmd.name)
        self.current = None
        rc = proc.returncode
        rec.update(rc=rc, ended_s=round(self.now(), 1), elapsed_s=round(self.now() - rec["started_s"], 1))
        if "sigkill_s" in rec:
            rec.update(status="cut", note=f"ignored SIGTERM at its deadline: SIGKILL {KILL_AFTER_S:.0f} s later")
        elif "sigterm_s" in rec:
            died = (" - died of the signal, before its own stop handling was set up (still starting, e.g. importing "
                    "torch)") if rc in (-signal.SIGTERM, -signal.SIGINT) else ""
            rec.update(status="cut", note="SIGTERM at its deadline" + (f" ({self.stopping})" if self.stopping else
                                                                       "") + f"; exit {rc}{died}")
        elif rc == 0:
            rec.update(status="ok", note="")
        else:
            rec.update(status="failed", note=f"exit {rc}")
        return rec

    @staticmethod
    def _signal_group(proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    @staticmethod
    def _echo(tail, prefix: str) -> None:
        data = tail.read()
        if data:
            for line in data.decode(errors="replace").splitlines():
                print(f"[{prefix}] {line}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# What ran and what was cut, from each command's outputs

def _junit(path: str) -> Optional[dict]:
    try:
        root = ET.parse(path).getroot()
    except Exception:
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname', '')}::{c.get('name', '')}" for s in suites for c in s.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    tot["passed"] = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
    tot["failed_tests"] = failed[:30]
    return tot


def _count_log(path: str) -> dict:
    counts = {}
    try:
        with open(path, errors="replace") as f:
            for line in f:
                for word in ("PASSED", "FAILED", "ERROR", "SKIPPED"):
                    if f" {word}" in line and "::" in line:
                        counts[word.lower()] = counts.get(word.lower(), 0) + 1
    except OSError:
        pass
    return counts


def details(cmd_kind: str, folder: str) -> dict:
    """Per command: which cases were measured and which were not (and why), read from what it wrote."""
    d: dict = {}
    if cmd_kind == "pytest":
        j = _junit(os.path.join(folder, "junit.xml"))
        if j is not None:
            d["tests"] = j
        else:
            d["tests_from_log"] = _count_log(os.path.join(folder, "output.log"))
            d["note"] = "no junit file (pytest did not reach its summary)"
        return d
    for name in ("group_attention.json", "token_prune.json", "profile.json", "calibration.json"):
        p = os.path.join(folder, name)
        if not os.path.exists(p):
            continue
        try:
            with open(p) as f:
                data = json.load(f)
        except Exception as e:
            d[name] = {"unreadable": str(e)[:200]}
            continue
        if name == "group_attention.json":
            rows = data.get("results", [])
            ran = [f"{r['shape']} B={r['B']} {r['dtype']} {r['mode']} {r['impl']}" for r in rows if "ms" in r]
            cut = [f"{r['shape']} B={r['B']} {r['dtype']} {r['mode']} {r['impl']}: {r['error']}" for r in rows
                   if "ms" not in r]
        elif name == "token_prune.json":
            rows = data.get("rows", [])
            ran = [f"{r['site']} B={r['B']} {r['dtype']} " + "/".join(i for i in ("fused", "eager", "compiled")
                                                                      if i in r) for r in rows if "fused" in r]
            cut = [f"{r['site']} B={r['B']} {r['dtype']}: {r['error']}" for r in rows if "error" in r]
        elif name == "profile.json":
            rows = data.get("latency", [])
            lab = lambda r: f"{r['backend']} {r['mode']} {r['path']} B={r['batch_size']} {r['dtype']}"  # noqa: E731
            ran = [lab(r) for r in rows if r.get("status") == "ok"]
            cut = [f"{lab(r)}: {r.get('status')}: {r.get('note')}" for r in rows if r.get("status") != "ok"]
        else:
            rows = data.get("records", [])
            ran = [r["config"] for r in rows if r.get("measured_us") is not None]
            cut = [f"{r['config']}: {r.get('note', 'not measured')}" for r in rows if r.get("measured_us") is None]
            if data.get("skipped"):
                cut = [f"stage skipped: {data['skipped']}"] + cut
        d[name] = {"ran": len(ran), "not_run": len(cut), "ran_cases": ran, "not_run_cases": cut}
    if not d:
        d["note"] = "no result file written"
    return d


# ----------------------------------------------------------------------------------------------------------------
# Summary and bundle

def _stage_status(cmds: List[dict]) -> str:
    if not cmds:
        return "not started"
    sts = [c["status"] for c in cmds]
    if all(s == "ok" for s in sts):
        return "ok"
    if any(s == "cut" or s == "not started" for s in sts):
        return "cut"
    return "failed"


def summary_markdown(summary: dict) -> str:
    L = [f"# GPU session {summary['label']}", "",
         f"- started: {summary['started']}; budget {summary['budget_s']:.0f} s; elapsed {summary['elapsed_s']:.1f} s",
         f"- stages: {' '.join(summary['stages_planned'])}", ""]
    env = summary.get("environment", "")
    if env:
        L += ["```", env.strip(), "```", ""]
    L += ["| stage | status | slot s | started s | ended s | deadline s | what ran | what was cut |",
          "|---|---|---:|---:|---:|---:|---|---|"]
    for st in summary["stages"]:
        ran, cut = [], []
        for c in st["cmds"]:
            for k, v in c.get("details", {}).items():
                if k == "tests":
                    ran.append(f"{c['cmd']}: {v['passed']} passed, {v['failures']} failed, {v['errors']} errors, "
                               f"{v['skipped']} skipped")
                elif k == "tests_from_log":
                    ran.append(f"{c['cmd']}: no junit file; from the log: "
                               + (", ".join(f"{n} {w}" for w, n in v.items()) or "no test finished"))
                elif isinstance(v, dict) and "ran" in v:
                    ran.append(f"{c['cmd']}: {v['ran']} cases")
                    if v["not_run"]:
                        cut.append(f"{c['cmd']}: {v['not_run']} cases")
            if c["status"] != "ok":
                cut.append(f"{c['cmd']}: {c['status']} ({c.get('note', '')})")
        slot = f"{st['slot_s']:.0f}" if st.get("slot_s") is not None else "-"
        L.append(f"| {st['stage']} | {st['status']} | {slot} | {st.get('started_s', '-')} | {st.get('ended_s', '-')} "
                 f"| {st.get('deadline_s', '-')} | {'; '.join(ran) or '-'} | {'; '.join(cut) or '-'} |")
    L += [""]
    for st in summary["stages"]:
        for c in st["cmds"]:
            for k, v in c.get("details", {}).items():
                if isinstance(v, dict) and v.get("not_run_cases"):
                    L += [f"Not run in {st['stage']}/{c['cmd']} ({k}):", ""] + [f"- {x}" for x in
                                                                              v["not_run_cases"][:60]] + [""]
                if k == "tests" and v.get("failed_tests"):
                    L += [f"Failed tests in {st['stage']}/{c['cmd']}:", ""] + [f"- {x}" for x in
                                                                             v["failed_tests"]] + [""]
    if summary.get("rerun"):
        L += ["To re-run what was cut or failed (second call):", "", "```", summary["rerun"], "```", ""]
    return "\n".join(L) + "\n"


def write_outputs(sess: Session, summary: dict, final: bool = False) -> None:
    summary["elapsed_s"] = round(sess.now(), 1)
    redo = [s["stage"] for s in summary["stages"] if s["status"] != "ok"]
    summary["rerun"] = (f'run(command="GPU_BUDGET_S=240 bash benchmarks/run_gpu.sh {" ".join(redo)}", '
                        f'carry=[".whl"], timeout_s=300)') if redo else ""
    md = summary_markdown(summary)
    for d in filter(None, (sess.res, sess.out)):
        with open(os.path.join(d, "summary.json.part"), "w") as f:
            json.dump(summary, f, indent=1)
        os.replace(os.path.join(d, "summary.json.part"), os.path.join(d, "summary.json"))
        with open(os.path.join(d, "summary.md"), "w") as f:
            f.write(md)
    if sess.out:
        log = os.path.join(sess.out, "run.log")
        if os.path.exists(log):
            shutil.copyfile(log, os.path.join(sess.res, "run.log"))
        arcroot = sess.label.split("/")[0]
        part = os.path.join(sess.out, BUNDLE + ".part")
        # write then rename: a call killed mid-bundle still leaves the previous complete bundle
        with tarfile.open(part, "w:gz") as tar:
            tar.add(os.path.join(sess.base, arcroot), arcname=arcroot)
        os.replace(part, os.path.join(sess.out, BUNDLE))


# ----------------------------------------------------------------------------------------------------------------

def environment_text(py: str, t_limit: float) -> str:
    lines = [time.strftime("date: %Y-%m-%dT%H:%M:%SZ", time.gmtime())]
    commit = os.environ.get("GTPT_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                    timeout=10).stdout.strip() or None
        except Exception:
            commit = None
    if not commit and os.path.exists(os.path.join(ROOT, ".whl", "commit.txt")):
        commit = open(os.path.join(ROOT, ".whl", "commit.txt")).read().strip() + " (from .whl/commit.txt)"
    lines.append(f"commit: {commit or 'unknown'}")
    probes = [["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.sm",
               "--format=csv,noheader"],
              [py, "-c", "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', "
                         "torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda, "
                         "'| cuda available', torch.cuda.is_available())"],
              [py, "-c", "import fvcore, pycocotools; print('fvcore + pycocotools importable')"]]
    procs = []
    for argv in probes:  # side by side, all within t_limit
        try:
            procs.append((argv, subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                                 cwd=ROOT, start_new_session=True)))
        except OSError as e:
            procs.append((argv, e))
    until = time.time() + t_limit
    for argv, p in procs:
        what = "device: " if argv[0] == "nvidia-smi" else ""
        if isinstance(p, OSError):
            lines.append(f"{what}{argv[0]}: {p}")
            continue
        try:
            out, err = p.communicate(timeout=max(0.1, until - time.time()))
            last = (out.strip() or (err.strip().splitlines() or [f"exit {p.returncode}"])[-1])
            lines.append(what + last)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            lines.append(f"{what}{' '.join(argv)[:60]}...: no answer within {t_limit:.0f} s")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stages", nargs="*", help="run only these stages (default: all, in priority order)")
    ap.add_argument("--rerun-failed", metavar="SUMMARY_JSON",
                    help="run only the stages that were cut or failed in that summary.json")
    ap.add_argument("--plan", metavar="FILE", help="JSON stage list replacing the built-in plan (tests)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and each stage's slot; run nothing")
    args = ap.parse_args(argv)

    t0 = float(os.environ.get("GPU_T0") or time.time())
    budget = _env_seconds("GPU_BUDGET_S", DEFAULT_BUDGET_S)
    if budget > 540 and not args.plan:
        print(f"warning: GPU_BUDGET_S={budget:.0f} leaves under a minute of the device tool's 600 s a command for "
              "the transfers; the call may be cut before the last bundle comes back", flush=True)
    py = os.environ.get("GPU_PYTHON", sys.executable)
    if args.plan:
        stages = plan_from_file(args.plan)
    else:
        stages = builtin_plan(py, xdist=not args.dry_run and _have("xdist", py),
                              pytest_timeout=not args.dry_run and _have("pytest_timeout", py))
    names = [s.name for s in stages]
    wanted = list(args.stages) or os.environ.get("STAGES", "").split()
    if args.rerun_failed:
        try:
            with open(args.rerun_failed) as f:
                prev = json.load(f)
            wanted += [s["stage"] for s in prev["stages"] if s["status"] != "ok"]
        except (OSError, ValueError, KeyError) as e:
            print(f"--rerun-failed {args.rerun_failed}: not a readable summary.json ({e})", file=sys.stderr)
            return 2
        if not wanted:
            print(f"--rerun-failed {args.rerun_failed}: every stage there was ok; nothing to re-run")
            return 0
    bad = [w for w in wanted if w not in names]
    if bad:
        print(f"unknown stage(s) {' '.join(bad)}; stages: {' '.join(names)}", file=sys.stderr)
        return 2
    if wanted:
        stages = [s for s in stages if s.name in wanted]

    if args.dry_run:
        left = budget - (time.time() - t0)
        print(f"plan for GPU_BUDGET_S={budget:.0f} ({left:.0f} s left), each stage using its whole slot:")
        for i, s in enumerate(stages):
            slot = slot_for(left, [x.share for x in stages[i:]])
            print(f"  {s.name:<12} slot {slot:5.0f} s  {s.what}")
            for c in s.cmds:
                folder = f"<out>/{s.name}/{c.name}" if len(s.cmds) > 1 else f"<out>/{s.name}"
                print("      $ " + " ".join(c.argv(folder, _inner_budget(
                    (slot - KILL_AFTER_S) / len(s.cmds)))))
            left -= slot
        return 0

    out = os.environ.get("OUT") or None
    date = time.strftime("%Y-%m-%d", time.gmtime(t0))
    label = date if not wanted else f"{date}/rerun-{time.strftime('%H%M%S', time.gmtime(t0))}"
    # on the device machine a fresh folder per call (a rerun on a warm machine bundles only its own files)
    base = tempfile.mkdtemp(prefix="gpu-results.") if out else os.path.join(ROOT, "benchmarks", "results")
    sess = Session(base, out, label, t0, budget)
    res = sess.res
    os.makedirs(res, exist_ok=True)

    def on_signal(signum, frame):  # the session itself told to stop: end the stage in flight, write what there is
        sess.stopping = f"session got {signal.Signals(signum).name}"
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    env_txt = environment_text(py, max(3.0, min(30.0, budget * 0.05)))
    with open(os.path.join(res, "environment.txt"), "w") as f:
        f.write(env_txt + f"stages: {' '.join(s.name for s in stages)} | budget: {budget:.0f} s\n")
    sess.say(env_txt.rstrip())
    summary = {"label": label, "started": _dt.datetime.fromtimestamp(t0, _dt.timezone.utc).isoformat(),
               "budget_s": budget, "kill_after_s": KILL_AFTER_S, "environment": env_txt,
               "stages_planned": [s.name for s in stages],
               "stages": [{"stage": s.name, "what": s.what, "status": "not started", "cmds": []} for s in stages]}
    write_outputs(sess, summary)

    for i, st in enumerate(stages):
        rec = summary["stages"][i]
        start = time.time()
        left = sess.end - start
        slot = slot_for(left, [x.share for x in stages[i:]])
        stage_end = start + slot
        rec.update(slot_s=round(slot, 1), started_s=round(start - t0, 1),
                   deadline_s=round(stage_end - KILL_AFTER_S - t0, 1))
        sess.say(f"=== stage {st.name}: slot {slot:.0f} s (SIGTERM at {stage_end - KILL_AFTER_S - t0:.0f} s, "
                 f"SIGKILL at {stage_end - t0:.0f} s of the session) - {st.what} ===")
        for j, cmd in enumerate(st.cmds):
            now = time.time()
            if sess.stopping or now >= stage_end - KILL_AFTER_S - 1:
                rec["cmds"].append({"cmd": cmd.name, "status": "not started",
                                    "note": sess.stopping or "the stage's deadline had passed"})
                continue
            # commands of one stage share its slot: each gets an equal part of what is left
            cmd_end = now + max((stage_end - now) / (len(st.cmds) - j), min(MIN_SLOT_S, stage_end - now))
            folder = os.path.join(res, st.name, cmd.name) if len(st.cmds) > 1 else os.path.join(res, st.name)
            c = sess.run_cmd(cmd, folder, cmd_end - KILL_AFTER_S)
            c["details"] = details(cmd.kind, folder)
            rec["cmds"].append(c)
            sess.say(f"--- {st.name}/{cmd.name}: {c['status']} {c.get('note', '')} ({c.get('elapsed_s', 0)} s)")
        rec["status"] = _stage_status(rec["cmds"])
        rec["ended_s"] = round(sess.now(), 1)
        sess.say(f"=== stage {st.name} {rec['status']} at {rec['ended_s']} s ===")
        write_outputs(sess, summary)
    write_outputs(sess, summary, final=True)
    sess.say(f"total: {sess.now():.1f} s of {budget:.0f}")
    sess.say(summary_markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
