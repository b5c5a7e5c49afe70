"""The parsing / estimation logic of ``benchmarks/static_cost.py`` on a checked-in SASS snippet (no compile).

``tests/data/static_cost/snippet.sass`` is a hand-written ``nvdisasm -gi`` listing of ``fake_kernel.py.txt``:
an outer loop (source line 9, ``for gq in range(0, G)``) around a conditional inner loop (line 11,
``for start_m in range(0, N, BLOCK_M)``, whose body holds an unrolled ``static_range``), 19 instructions:
3 before the loops, the outer loop 0x30..0xf0 (13 instructions, 5 of its own), the inner loop 0x50..0xc0 (8),
3 after, and the trailing ``BRA self`` (not a loop).

Launch used below: B=4, G=3, N=82, S=6, BLOCK_N=BLOCK_M=32, grid (12, 1, 3) = 36 programs of 4 warps. By hand:
the outer loop runs G=3 times per program (108 in all); the inner loop runs in all 3 groups for the first key
tile (start_n=0 < S) and in the program's own group otherwise: 3*3 + 3 + 3 = 15 per (b, g), 180 in all.
Warp instructions = (8*180 + 5*108 + 6*36) * 4 = 8784; 36 programs fit on 132 SMs, so the busiest SM issues one
program, 8784/36 = 244 warp instructions, in 244 / (4 * 1.755e3) us.
"""
import importlib.util
import json
import math
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "tests", "data", "static_cost")
RESULTS = os.path.join(REPO, "benchmarks", "results", "static", "2026-12-01", "before")


@pytest.fixture(scope="module")
def sc():
    spec = importlib.util.spec_from_file_location("static_cost", os.path.join(REPO, "benchmarks", "static_cost.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def snippet():
    with open(os.path.join(DATA, "snippet.sass")) as f:
        return f.read()


@pytest.fixture(scope="module")
def source():
    with open(os.path.join(DATA, "fake_kernel.py.txt")) as f:
        return f.read()


ARGS = dict(G=3, N=82, S=6)
CONSTS = dict(BLOCK_N=32, BLOCK_M=32, R=2)
GRID = (12, 1, 3)


def test_parse_and_loops(sc, snippet):
    instrs = sc.parse_sass(snippet)
    assert len(instrs) == 19
    assert [i["op"] for i in instrs[:3]] == ["S2R", "S2R", "CS2R"]
    assert instrs[4]["op"] == "BRA" and instrs[4]["target"] == 0xD0  # forward branch (the if)
    assert instrs[-1]["target"] == instrs[-1]["addr"]  # BRA self
    assert instrs[8]["loc"] == (("standard.py", 40), ("fake_kernel.py", 13))
    loops = sc.find_loops(instrs)
    assert [(lp["start"], lp["end"], lp["depth"], lp["parent"]) for lp in loops] == [(3, 15, 0, None), (5, 12, 1, 0)]
    _, loops, classes, mem = sc.analyse_sass(snippet)
    assert [(lp["instructions"], lp["exclusive"], lp["forward_branches"]) for lp in loops] == [(13, 5, 1), (8, 8, 0)]
    assert classes["mma"] == 1 and classes["fma"] == 1
    assert mem == {"LDG.E.128": 1, "LDGSTS.E.BYPASS.128": 1, "LDG.E.U16": 1, "STG.E": 1}
    assert [sc.load_width_bits(op) for op in ("LDG.E.128", "LDG.E.U16", "LDG.E", "LDGSTS.E.BYPASS.LTC128B.128",
                                              "LDG.E.64.CONSTANT", "FFMA")] == [128, 16, 32, 128, 64, None]
    # the compact listing the report saves parses to the same instructions
    again = sc.parse_sass(sc._shorten_sass(snippet))
    assert [(i["addr"], i["op"], i["loc"], i["target"]) for i in again] == \
        [(i["addr"], i["op"], i["loc"], i["target"]) for i in instrs]


def test_trip_walker(sc, source):
    env = dict(ARGS, **CONSTS)
    w = sc.TripWalker(source, 1, env)
    assert [(sl["line"], sl["depth"], sl["static"]) for sl in w.loops] == [(9, 0, False), (11, 1, False), (12, 2, True)]
    full = w.grid_counts(GRID)
    assert dict(full) == {9: 108, 11: 180, 12: 360}
    assert w.grid_counts(GRID, batch=4) == full  # batch 0 x 4, checked against batch 1
    assert not w.flags
    # an if on a tensor value is assumed taken, and flagged
    w2 = sc.TripWalker(source.replace("if (gq == g) | (start_n < S):", "if tl.load(X) > 0:"), 1, env)
    assert w2.grid_counts(GRID)[11] == 36 * 3 * 3
    assert any("line 10" in f for f in w2.flags)


def test_occupancy_and_waves(sc):
    # 181 regs x 128 threads: 23 x 256 regs per warp -> 11 warps -> 2 blocks (the dk/dv kernel today)
    assert sc.blocks_per_sm(181, 9472, 128) == (2, "regs")
    assert sc.blocks_per_sm(128, 17664, 128)[0] == 4
    assert sc.blocks_per_sm(95, 21504, 128)[0] == 5
    assert sc.blocks_per_sm(32, 200 * 1024, 128) == (1, "smem")
    assert sc.blocks_per_sm(16, 0, 64)[0] == 32  # block limit
    assert sc.blocks_per_sm(16, 0, 1024) == (2, "threads")
    assert sc.waves(9216, 4) == pytest.approx(9216 / 528)
    assert sc.issue_time_us(132 * 100, 132) == pytest.approx(100 / (4 * 1.755e3))
    assert sc.issue_time_us(133 * 100, 133) == pytest.approx(200 / (4 * 1.755e3))  # a second wave on one SM
    # the special-function unit: 16 results per clock per SM, so a warp's MUFU takes 2 clocks
    assert sc.mufu_time_us(132 * 100, 132) == pytest.approx(100 * 2 / 1.755e3)


def test_estimate_launch_record(sc, snippet, source):
    analysis = sc.analyse_sass(snippet)
    meta = dict(num_warps=4, shared=8192, regs=181, local=0, stack=0)
    nbytes = 4 * 3 * 82 * 576 * 2
    tensors = {"X": dict(shape=[4, 3, 82, 576], strides=[3 * 82 * 576, 82 * 576, 576, 1], elem=2,
                         fp=sc.footprint_bytes([4, 3, 82, 576], [3 * 82 * 576, 82 * 576, 576, 1], 2))}
    rec = sc.estimate_launch("fake_kernel", analysis, meta, GRID, 4, dict(ARGS), dict(CONSTS), tensors, source, 1,
                             {}, "fake_kernel.py")
    assert rec["loop_instructions"] == 8  # the inner loop is the hot one: 8 x 180 > 5 x 108
    assert [lp["source_line"] for lp in rec["loops"]] == [9, 11]
    assert [lp["executions"] for lp in rec["loops"]] == [108, 180]
    assert rec["executed_warp_instructions"] == 8784
    assert rec["issue_us"] == pytest.approx(244 / (4 * 1.755e3), abs=1e-3)
    assert rec["bytes"] == nbytes
    assert rec["floor_us_h100"] == pytest.approx(nbytes / 3.35e12 * 1e6, abs=1e-3)
    assert rec["floor_us_h200"] == pytest.approx(nbytes / 4.8e12 * 1e6, abs=1e-3)
    assert rec["estimate_us"] == pytest.approx(max(rec["issue_us"], rec["mufu_us"], rec["floor_us_h100"]), abs=1e-3)
    assert rec["ratio"] == pytest.approx(rec["estimate_us"] / rec["floor_us_h100"], rel=1e-2)
    assert rec["blocks_per_sm"] == 2 and rec["programs"] == 36
    assert rec["waves"] == pytest.approx(36 / (132 * 2), abs=1e-3) and rec["waves_ceil"] == 1
    assert rec["spill_bytes"] == 0 and rec["registers"] == 181
    # the outer loop's body skips the inner loop behind a branch and holds 5 x 108 x 4 / 8784 = 25% of the issue
    outer = rec["loops"][0]
    assert outer["forward_branches"] == 1 and outer["share"] == pytest.approx(5 * 108 * 4 / 8784, abs=1e-3)
    assert any("SASS loop 0" in f and "forward branch" in f for f in rec["flags"])


REQUIRED = {"op": str, "kernel": str, "shape": str, "variant": str, "batch": int, "dtype": str, "registers": int,
            "spill_bytes": int, "blocks_per_sm": int, "loop_instructions": int, "bytes": int,
            "floor_us_h100": (int, float), "estimate_us": (int, float), "ratio": (int, float), "sass": str}


def test_committed_report_schema(sc):
    """The committed baseline run: every record has the issue's fields, names a SASS file that exists (whose loops
    re-parse to the record's), and its figures are consistent with each other."""
    path = os.path.join(RESULTS, "static_cost.json")
    if not os.path.exists(path):
        pytest.skip("no committed static report")
    with open(path) as f:
        records = json.load(f)
    assert records
    ops, shapes = set(), set()
    parsed = {}
    for r in records:
        if r["sass"] not in parsed:
            with open(os.path.join(RESULTS, r["sass"])) as f:
                instrs, loops, _, _ = sc.analyse_sass(f.read())
            parsed[r["sass"]] = (len(instrs), [(lp["instructions"], lp["exclusive"]) for lp in loops])
        n, loops = parsed[r["sass"]]
        assert n == r["kernel_instructions"], r["sass"]
        assert loops == [(lp["instructions"], lp["exclusive"]) for lp in r["loops"]], r["sass"]
        for key, typ in REQUIRED.items():
            assert isinstance(r.get(key), typ), (key, r.get(key), r.get("config"))
        assert os.path.exists(os.path.join(RESULTS, r["sass"])), r["sass"]
        assert r["estimate_us"] >= r["floor_us_h100"] - 1e-6
        assert r["ratio"] == pytest.approx(r["estimate_us"] / r["floor_us_h100"], rel=1e-2)
        assert r["waves"] == pytest.approx(r["programs"] / (132 * r["blocks_per_sm"]), abs=1e-2)
        assert r["floor_us_h100"] == pytest.approx(r["bytes"] / 3.35e12 * 1e6, rel=1e-3, abs=1e-3)
        ops.add(r["op"])
        shapes.add(r["shape"])
    assert ops == {"mhga", "prune"}
    assert {"fine", "late_fine", "teacher", "wholebody", "coarse", "fine_entry", "coarse_l3", "fine_l3"} <= shapes
    assert {r["variant"] for r in records} == {"gtpt-s", "gtpt-b", "gtpt-s-wholebody"}
    assert {r["batch"] for r in records} == {32, 128} and {r["dtype"] for r in records} == {"bf16", "fp32"}
    assert math.isfinite(sum(r["estimate_us"] for r in records))


def test_targets_and_comparison(sc):
    def rec(kernel, shape, direction, est, floor, regs=100, spill=0, op="mhga"):
        return dict(op=op, kernel=kernel, shape=shape, variant="gtpt-s", batch=128, dtype="bf16", direction=direction,
                    estimate_us=est, floor_us_h100=floor, registers=regs, spill_bytes=spill, config=kernel + shape)
    before = [rec("_fwd", "fine", "fwd", 30.0, 10.0), rec("_dq", "fine", "bwd", 30.0, 10.0),
              rec("_dkdv", "fine", "bwd", 50.0, 10.0, regs=181), rec("_prune", "fine_l3", "fwd", 90.0, 8.0, op="prune")]
    # a rewrite that splits dk/dv in two kernels: the backward is compared as a whole
    after = [rec("_fwd", "fine", "fwd", 12.0, 10.0), rec("_dq", "fine", "bwd", 15.0, 10.0),
             rec("_dkdv_shared", "fine", "bwd", 5.0, 2.0, regs=120), rec("_dkdv_own", "fine", "bwd", 15.0, 8.0, regs=128),
             rec("_prune", "fine_l3", "fwd", 17.0, 8.0, op="prune", spill=8)]
    totals = sc.shape_totals(after)
    assert totals[("gtpt-s", 128, "bf16", "mhga", "fine", "bwd")]["ratio"] == pytest.approx(35.0 / 20.0)
    checks = {w: (v, ok) for w, v, lim, ok in sc.check_targets(after)}
    assert checks["gtpt-s fine MHGA fwd ratio"] == (1.2, True)
    assert checks["gtpt-s fine MHGA bwd ratio"] == (1.75, True)
    assert checks["gtpt-s fine_l3 prune ratio"] == (2.12, False)
    assert checks["max registers of the dk/dv kernel(s)"] == (128, True)
    assert checks["configs that spill (any batch / dtype)"] == (1, False)
    assert {w: ok for w, v, lim, ok in sc.check_targets(before)}["max registers of the dk/dv kernel(s)"] is False
    rows = {r[:6]: r[6:] for r in sc.compare_runs(after, before)}
    assert rows[("gtpt-s", 128, "bf16", "mhga", "fine", "bwd")][:2] == (pytest.approx(4.0), pytest.approx(1.75))
