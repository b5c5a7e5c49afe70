"""The GPU registration of the ops (``torch.library.triton_op``), traced the way ``torch.compile`` traces it, without
a GPU.

On a GPU the ops are ``triton_op``s: under AOTAutograd's functionalization they decompose into
``triton_kernel_wrapper_functional`` calls of our kernels, which Inductor then schedules itself. Under the
interpreter (CPU CI) they are opaque ``custom_op``s instead, so the decomposition, the launch arguments
``wrap_triton`` captures and torch's mutation analysis of each kernel (which decides what Inductor must clone) would
otherwise only ever run on a GPU. Here a worker subprocess (``TRITON_INTERPRET`` unset, a stand-in driver reporting
an sm_90 target, from ``test_kernels_compile``) traces every op with ``make_fx`` over fake CUDA tensors under
``dispatch_functionalize`` and reports, per kernel launch: the kernel, its grid and the tensors the mutation
analysis says it writes. Inputs are built with ``empty_strided`` (the model's strided views of the packed qkv):
a CPU-only torch build cannot slice fake CUDA tensors.

Checks: no ``gtpt`` custom op survives (everything decomposed), the launches are the expected kernels with the
launchers' grids, and exactly the op's outputs (and the backward's delta scratch) are written - never an input,
which would make Inductor clone the packed qkv on every call.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, G, H, D = 2, 3, 8, 24
C = H * D


def _worker(out_path):
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.pop("GTPT_KERNELS_OPAQUE_OP", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.path[:0] = [REPO, os.path.join(REPO, "tests")]
    from test_kernels_compile import _unavailable_reason, _use_sm90_driver

    def done(result):
        with open(out_path, "w") as f:
            json.dump(result, f)

    reason = _unavailable_reason()
    if reason is None and not hasattr(torch.library, "triton_op"):
        reason = "this torch has no torch.library.triton_op"
    if reason is not None:
        return done({"__skip__": reason})
    import warnings
    warnings.filterwarnings("ignore")
    _use_sm90_driver()  # the mutation analysis lowers each kernel to TTIR for the current target
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    import gtpt_kernels.ops.group_attention as ga
    import gtpt_kernels.ops.token_prune as tp
    from gtpt_kernels import softmax_pool_scores, token_prune
    if ga._OPAQUE_OP or tp._OPAQUE:
        return done({"__skip__": "ops registered opaque (interpreter or GTPT_KERNELS_OPAQUE_OP set)"})
    tp._check_mask_rows = lambda mask: None  # a value check: fake tensors have no values

    def launches(fn, *args):
        gm = make_fx(dispatch_functionalize(fn), tracing_mode="fake")(*args)
        out = []
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            name = str(node.target)
            if "triton_kernel_wrapper" in name:
                kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
                kernel = getattr(kernel, "fn", kernel)  # Autotuner / JITFunction
                out.append({"kernel": getattr(kernel, "__name__", str(kernel)),
                            "grid": [list(g) for g in node.kwargs["grid"]],
                            "writes": sorted(node.kwargs.get("tensors_to_clone", []))})
            elif "gtpt" in name:
                out.append({"undecomposed": name})
        return out

    results = {}
    mode = FakeTensorMode()
    with mode:
        # MHGA at GTPT-S fine layers (3 groups x 82 tokens, 6 shared, pad token), bf16, and the coarse layer.
        qkv = torch.empty(B, G, 82, 3 * C, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(B, G, 82, C, device="cuda", dtype=torch.bfloat16)
        lse = torch.empty(B, G, H, 82, device="cuda", dtype=torch.float32)
        coarse = torch.empty(B, 1, 257, 3 * C, device="cuda", dtype=torch.float32)
        # WholeBody fine L3 pruning in one call: q = the first 74 rows, k / tokens from token 12 of (B, 3, 134, .).
        T = 134
        qkv_strides = (G * T * 3 * C, T * 3 * C, D, 3 * C, 1)
        q = torch.empty_strided((B, G, H, 74, D), qkv_strides, device="cuda", dtype=torch.bfloat16)
        k = torch.empty_strided((B, G, H, 122, D), qkv_strides, device="cuda", dtype=torch.bfloat16)
        tokens = torch.empty_strided((B, G, 122, C), (G * T * C, T * C, C, 1), device="cuda", dtype=torch.bfloat16)
        pos = torch.empty(B, G, 122, C, device="cuda", dtype=torch.bfloat16)
        gate = torch.empty(B, G, 122, C, device="cuda", dtype=torch.bfloat16)
        rows = torch.empty(G, 74, device="cuda", dtype=torch.bool)
        cols = torch.empty(G, 122, device="cuda", dtype=torch.bool)
    scale = C ** -0.5
    cases = {
        "mhga_forward": (lambda x: ga.group_attention(x, H, 6, scale, True, backend="triton"), (qkv,)),
        "mhga_coarse_forward": (lambda x: ga.group_attention(x, H, 0, scale, False, backend="triton"), (coarse,)),
        "mhga_backward": (lambda g_, x, o, l: torch.ops.gtpt.group_attention_backward(g_, x, o, l, H, 6, scale, True,
                                                                                      "ieee"), (out, qkv, out, lse)),
        "token_prune": (lambda *a: token_prune(*a[:4], 70, scale, row_mask=a[4], gate=a[5], col_mask=a[6],
                                               gate_logits=True, backend="triton"),
                        (q, k, tokens, pos, rows, gate, cols)),
        "softmax_pool_scores": (lambda a, b_, r: softmax_pool_scores(a, b_, scale, r, backend="triton"), (q, k, rows)),
    }
    for name, (fn, args) in cases.items():
        try:
            results[name] = launches(fn, *args)
        except Exception as e:  # reported by the test that needs it
            results[name] = {"error": f"{type(e).__name__}: {e}"[:3000]}
    # The pruning ops planned for a 132-SM GPU (fake tensors have no device to ask): B * G = 6 programs split the
    # columns, so scoring and selection are two launches.
    tp._SPLIT_SM_COUNT = 132
    for name in ("token_prune", "softmax_pool_scores"):
        fn, args = cases[name]
        try:
            results[name + "_split"] = launches(fn, *args)
        except Exception as e:
            results[name + "_split"] = {"error": f"{type(e).__name__}: {e}"[:3000]}
    done(results)


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    out = tmp_path_factory.mktemp("trace") / "trace.json"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(out)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"trace worker failed (rc={proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    res = json.loads(out.read_text())
    if "__skip__" in res:
        pytest.skip(res["__skip__"])
    return res


def _launches(traced, name):
    res = traced[name]
    assert not isinstance(res, dict), f"{name} failed to trace: {res['error']}"
    undecomposed = [r["undecomposed"] for r in res if "undecomposed" in r]
    assert not undecomposed, f"{name}: custom ops left opaque in the traced graph: {undecomposed}"
    return res


def test_mhga_forward_decomposes(traced):
    (fwd,) = _launches(traced, "mhga_forward")
    # One program per (batch x group, head, 32-row query tile): 82 rows -> 3 tiles.
    assert fwd == {"kernel": "_mhga_fwd_kernel", "grid": [[B * G, H, 3]], "writes": ["LSE", "O"]}
    (coarse,) = _launches(traced, "mhga_coarse_forward")
    assert coarse == {"kernel": "_mhga_fwd_kernel", "grid": [[B, H, 9]], "writes": ["LSE", "O"]}  # fp32: 32 rows


def test_mhga_backward_decomposes(traced):
    dq, dkdv = _launches(traced, "mhga_backward")
    # The dq launch also writes delta (rowsum(dO * O)), which the dk/dv launch reads: two launches, no atomics.
    assert dq == {"kernel": "_mhga_bwd_dq_kernel", "grid": [[B * G, H, 3]], "writes": ["DELTA", "DQKV"]}
    assert dkdv == {"kernel": "_mhga_bwd_dkdv_kernel", "grid": [[B * G, H, 3]], "writes": ["DQKV"]}


def test_token_prune_decomposes_to_one_launch(traced):
    (launch,) = _launches(traced, "token_prune")
    assert launch == {"kernel": "_prune_kernel", "grid": [[B * G, 1, 1]],
                      "writes": ["idx_ptr", "out_pos_ptr", "out_ptr", "scores_ptr"]}
    (scores,) = _launches(traced, "softmax_pool_scores")
    assert scores == {"kernel": "_prune_kernel", "grid": [[B * G, 1, 1]], "writes": ["scores_ptr"]}


def test_token_prune_split_decomposes_to_two_launches(traced):
    # 122 columns = 2 score chunks of 64: two column slices per (batch, group).
    scores_launch, select = _launches(traced, "token_prune_split")
    assert scores_launch == {"kernel": "_prune_kernel", "grid": [[B * G * 2, 1, 1]], "writes": ["scores_ptr"]}
    assert select == {"kernel": "_prune_select_kernel", "grid": [[B * G * 2, 1, 1]],
                      "writes": ["idx_ptr", "out_pos_ptr", "out_ptr"]}
    (scores,) = _launches(traced, "softmax_pool_scores_split")
    assert scores == {"kernel": "_prune_kernel", "grid": [[B * G * 2, 1, 1]], "writes": ["scores_ptr"]}


if __name__ == "__main__":
    _worker(sys.argv[1])
