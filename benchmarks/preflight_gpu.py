#!/usr/bin/env python3
"""CPU preflight for the GPU call: run here, after ``bash benchmarks/fetch_gpu_wheels.sh``, before any GPU is asked
for. ``python3 benchmarks/preflight_gpu.py [--budget-s 420]``; exit 0 and the exact device call on the last lines
when everything the GPU run needs is in place, 1 (with one line per problem) when not.

Checks, with no package registry (the GPU machine has none):

* the carried wheels (``.whl/*.whl``) install offline (``pip --no-index --no-deps``) into a scratch folder, and
  ``.whl/commit.txt`` names this checkout's HEAD;
* in a child interpreter that sees only the repository, that scratch folder and this machine's packages, every
  module the GPU run imports imports: the repository's packages, the benchmark scripts, the stage runners, and
  (through ``pytest --collect-only``) every test module (a wheel built for the GPU's Python 3.12 that this Python
  cannot load is checked with this machine's copy of the package); each third-party module it loaded comes from the carried
  wheels or from a distribution the GPU image has (its package list, ``GPU_IMAGE_PACKAGES`` below), else it would
  fail there;
* every stage's case list is non-empty: each benchmark command of the plan is asked for its cases
  (``--list-cases``), each ``gtpt profile`` command is parsed by the CLI's own parser, each pytest command collects
  at least one test with no collection error;
* the working tree that travels (tracked + untracked-not-ignored files + ``.whl``) is under the 64 MiB limit.

Not checked (cannot be here): that the GPU image's torch 2.11 / triton 3.6 accept what this machine's versions do.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

# The distributions the GPU image ('cuda') holds, as the device tool's documentation lists them
# (.library/device/KINDS.md, "Python packages already there", read on such a machine 2026-11-17).
GPU_IMAGE_PACKAGES = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers
flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas
pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp""".split()
TREE_LIMIT = 64 * 2 ** 20

# Imported by the GPU run beyond what the test collection and the scripts' own imports reach.
EXTRA_IMPORTS = ("torch.nn.attention.flex_attention", "torch.profiler", "triton.testing", "matplotlib", "fvcore",
                 "pycocotools.coco", "pycocotools.cocoeval", "pytest_benchmark")


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


# ----------------------------------------------------------------------------------------------------------------
# child: runs with PYTHONPATH = scratch (carried wheels) : repository

def child(scratch: str, foreign: list) -> int:
    """``foreign``: top-level modules of carried wheels built for another Python than this one (checked with this
    machine's copy; they count as carried)."""
    import importlib
    import importlib.metadata as md
    import io
    import contextlib
    problems, notes = [], []
    os.chdir(ROOT)
    import gpu_session
    plan = gpu_session.builtin_plan("python3")
    # 1. every stage's case list
    from gtpt.cli import build_parser
    from gtpt.config import get_config
    collected = {}
    for st in plan:
        for c in st.cmds:
            argv = c.argv("/tmp/preflight-out", 60.0)
            where = f"stage {st.name}/{c.name}"
            if argv[1:3] == ["-m", "gtpt"]:
                try:
                    a = build_parser().parse_args(argv[3:])
                except SystemExit:
                    problems.append(f"{where}: gtpt {' '.join(argv[3:])}: rejected by the CLI parser")
                    continue
                for v in a.variants:
                    get_config(v)
                n = (len(a.variants) * len(a.backends) * len(a.dtypes) * len(a.batch_sizes)
                     * sum(len(a.paths) if m == "inference" else 1 for m in a.modes))
                (notes if n else problems).append(f"{where}: {n} gtpt profile configs")
            elif argv[1].endswith("gpu_pytest.py"):
                if "GTPT_PYTEST_SELECT" not in c.env:
                    continue  # the whole suite: collected in this process below
                env = dict(os.environ, **c.env)
                args = [a for a in argv[2:] if not a.startswith(("--junitxml", "--durations", "--timeout"))
                        and a not in ("-n", "8", "-v", "-rs")]
                p = subprocess.run([sys.executable, argv[1], *args, "--collect-only", "-q"], cwd=ROOT, env=env,
                                   capture_output=True, text=True, timeout=600)
                lines = p.stdout.strip().splitlines()
                tail = lines[-1] if lines else p.stderr.strip()[-300:]
                errors = [ln for ln in lines if ln.startswith("ERROR ")]
                if errors or p.returncode != 0 or "no tests" in tail:
                    problems.append(f"{where}: pytest collection: {tail}; " + "; ".join(errors[:5]))
                else:
                    notes.append(f"{where}: {tail}")
            else:
                p = subprocess.run([sys.executable, *argv[1:], "--list-cases"], cwd=ROOT, capture_output=True,
                                   text=True, timeout=300)
                n = len(p.stdout.strip().splitlines())
                if p.returncode != 0:
                    problems.append(f"{where}: --list-cases exit {p.returncode}: "
                                    f"{(p.stderr.strip().splitlines() or p.stdout.strip().splitlines() or [''])[-1]}")
                else:
                    notes.append(f"{where}: {n} cases" if "calibration" not in argv[1] or n != 1 else
                                 f"{where}: {p.stdout.strip()}")
    # 2. imports: the scripts and runners, then every test module through pytest's own collection (in this
    # process, so that what they import is in sys.modules below)
    for m in ("gtpt", "gtpt.cli", "gtpt.train", "gtpt.evaluate", "gtpt.inference", "gtpt.profiler", "gtpt_kernels",
              "run_group_attention", "run_token_prune", "run_calibration", "gpu_pytest", *EXTRA_IMPORTS):
        try:
            importlib.import_module(m)
        except Exception as e:
            problems.append(f"import {m}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    import pytest
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = pytest.main(["tests", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "--ignore=tests/test_kernels_compile.py"])
    lines = buf.getvalue().strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("ERROR ")]
    if rc != 0 or errors:
        problems.append(f"stage rest/suite: pytest collection exit {int(rc)}: " + "; ".join(errors[:5] or lines[-1:]))
    else:
        notes.append(f"stage rest/suite: {lines[-1] if lines else '?'}")
    # 3. where each third-party module came from
    image = {_norm(p) for p in GPU_IMAGE_PACKAGES}
    dists = md.packages_distributions()
    stdlib = set(getattr(sys, "stdlib_module_names", ()))
    carried, missing = set(foreign), {}
    for name, mod in list(sys.modules.items()):
        top = name.split(".")[0]
        f = getattr(mod, "__file__", None) or ""
        if not f or top in stdlib or top.startswith("_") or f.startswith(ROOT + os.sep) or top in foreign:
            continue
        if f.startswith(scratch + os.sep):
            carried.add(top)
            continue
        owners = dists.get(top, [top])
        if not any(_norm(o) in image for o in owners):
            missing.setdefault(top, owners)
    for top, owners in sorted(missing.items()):
        problems.append(f"module {top} (distribution {', '.join(owners)}) is imported but neither carried in .whl/ "
                        f"nor in the GPU image: add it to benchmarks/fetch_gpu_wheels.sh")
    notes.append(f"carried in .whl/: {' '.join(sorted(carried)) or 'nothing'}"
                 + (f" ({' '.join(foreign)} built for the GPU's Python, checked with this machine's copy)"
                    if foreign else ""))
    print(json.dumps({"problems": problems, "notes": notes}))
    return 0


def _top_levels(wheel: str) -> list:
    import zipfile
    with zipfile.ZipFile(wheel) as z:
        tl = [n for n in z.namelist() if n.endswith(".dist-info/top_level.txt")]
        if tl:
            return z.read(tl[0]).decode().split()
        return sorted({n.split("/")[0] for n in z.namelist() if not n.split("/")[0].endswith((".dist-info", ".data"))})


# ----------------------------------------------------------------------------------------------------------------

def tree_bytes() -> int:
    p = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                       capture_output=True)
    total = 0
    for f in p.stdout.decode().split("\0"):
        fp = os.path.join(ROOT, f)
        if f and os.path.isfile(fp):
            total += os.path.getsize(fp)
    for dirpath, _, files in os.walk(os.path.join(ROOT, ".whl")):
        total += sum(os.path.getsize(os.path.join(dirpath, x)) for x in files)
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-s", type=int, default=420, help="GPU_BUDGET_S of the call (default 420)")
    ap.add_argument("--child", metavar="SCRATCH", help=argparse.SUPPRESS)
    ap.add_argument("foreign", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child, args.foreign)
    if not 60 <= args.budget_s <= 540:
        print("--budget-s: give 60 to 540 s (the device allows 600 s a command, transfers included)", file=sys.stderr)
        return 2
    problems, notes = [], []
    wheels = sorted(glob.glob(os.path.join(ROOT, ".whl", "*.whl")))
    if not wheels:
        problems.append(".whl/ holds no wheels: run `bash benchmarks/fetch_gpu_wheels.sh` first")
    commit_txt = os.path.join(ROOT, ".whl", "commit.txt")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    if not os.path.exists(commit_txt):
        problems.append(".whl/commit.txt missing: run `bash benchmarks/fetch_gpu_wheels.sh` after the last commit")
    else:
        recorded = open(commit_txt).read().strip()
        if not recorded.startswith(head):
            problems.append(f".whl/commit.txt says {recorded[:12]}, HEAD is {head[:12]}: re-run "
                            "`bash benchmarks/fetch_gpu_wheels.sh` after the last commit")
        elif "local changes" in recorded:
            notes.append("the tree had uncommitted changes when the wheels were fetched: results will say so")
    scratch = tempfile.mkdtemp(prefix="gpu-preflight.")
    try:
        foreign = []
        for w in wheels:  # one by one: a wheel for the GPU's Python (3.12) may not install on this one
            pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                   "--no-cache-dir", "--upgrade", "--target", scratch]
            p = subprocess.run(pip + [w], capture_output=True, text=True)
            if p.returncode != 0 and "not a supported wheel" in p.stderr:
                # the GPU's interpreter: CPython 3.12, x86-64 (what fetch_gpu_wheels.sh downloads for)
                p = subprocess.run(pip + ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:",
                                          "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64",
                                          "--target", os.path.join(scratch, ".gpu-python"), w],
                                   capture_output=True, text=True)
                foreign += _top_levels(w)
            if p.returncode != 0:
                problems.append(f"{os.path.basename(w)} does not install offline: "
                                + (p.stderr.strip().splitlines() or ["?"])[-1])
        env = dict(os.environ, PYTHONPATH=f"{scratch}{os.pathsep}{ROOT}", PYTHONNOUSERSITE="1", PIP_NO_INDEX="1")
        env.pop("TRITON_INTERPRET", None)
        p = subprocess.run([sys.executable, "-s", os.path.abspath(__file__), "--child", scratch, *foreign], cwd=ROOT,
                           env=env, capture_output=True, text=True)
        try:
            res = json.loads(p.stdout.strip().splitlines()[-1])
            problems += res["problems"]
            notes += res["notes"]
        except (IndexError, ValueError, KeyError):
            problems.append(f"the import check failed (exit {p.returncode}): "
                            + (p.stderr.strip().splitlines() or ["no output"])[-1])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    size = tree_bytes()
    (problems if size > TREE_LIMIT else notes).append(f"the working tree that travels: {size / 2 ** 20:.1f} MiB "
                                                      f"(limit {TREE_LIMIT / 2 ** 20:.0f})")
    for n in notes:
        print("ok:", n)
    for pr in problems:
        print("PROBLEM:", pr)
    if problems:
        print(f"preflight: {len(problems)} problem(s); fix them before asking for a GPU")
        return 1
    budget = "" if args.budget_s == 420 else f"GPU_BUDGET_S={args.budget_s} "
    print("preflight passed (torch / triton here: not the GPU image's 2.11 / 3.6). The GPU call:")
    print(f'run(command="{budget}bash benchmarks/run_gpu.sh", carry=[".whl"], timeout_s={args.budget_s + 60})')
    print("then here: tar -xzf FILES_AT/gpu-results.tar.gz -C benchmarks/results")
    return 0


if __name__ == "__main__":
    sys.exit(main())
