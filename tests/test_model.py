"""The lean GTPT model against the official implementation's numbers, shapes, names and forward semantics."""
import io
from pathlib import Path

import pytest
import torch

import gtpt
from gtpt.checkpoint import CheckpointError, load_official_checkpoint, save_checkpoint
from gtpt.summary import parameters_per_stage, token_schedule
from gtpt_kernels.testing import assert_close

from official_port import official_forward

VARIANTS = gtpt.list_variants()
# Trainable parameters without the frozen PE: gtpt-reference.md §1 (measured on the official model classes).
OFFICIAL_PARAMS = {"gtpt-t": 2_372_864, "gtpt-s": 5_429_856, "gtpt-b": 8_318_752, "gtpt-t-wholebody": 2_388_352,
                   "gtpt-s-wholebody": 5_453_088, "gtpt-b-wholebody": 8_341_984}
KEYS_TSV = Path(__file__).parent / "data" / "official-checkpoint-keys.tsv"
TSV_BLOCK = {"gtpt-t": "coco gtpt-t", "gtpt-s": "coco gtpt-s", "gtpt-b": "coco gtpt-b",
             "gtpt-t-wholebody": "coco_wholebody gtpt-t", "gtpt-s-wholebody": "coco_wholebody gtpt-s",
             "gtpt-b-wholebody": "coco_wholebody gtpt-b"}


def official_keys(variant):
    keys, block = {}, None
    for line in KEYS_TSV.read_text().splitlines():
        if line.startswith("## "):
            block = line[3:].split(":")[0]
            continue
        if line.startswith("#") or not line.strip() or block != TSV_BLOCK[variant]:
            continue
        name, shape, dtype = line.split("\t")
        keys[name] = (tuple(int(s) for s in shape.strip("()").split(",") if s.strip()), dtype)
    return keys


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {v: gtpt.build_model(v, backend="reference").eval() for v in VARIANTS}


def images(b=2, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 256, 192, generator=g).to(dtype)


@pytest.mark.parametrize("variant", VARIANTS)
def test_trainable_parameters_match_official(models, variant):
    m = models[variant]
    assert gtpt.num_trainable_parameters(m) == OFFICIAL_PARAMS[variant]
    assert sum(parameters_per_stage(m).values()) == OFFICIAL_PARAMS[variant]
    assert not m.features.pos_embedding.requires_grad


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_names_and_shapes_match_official(models, variant):
    ours = {k: (tuple(v.shape), str(v.dtype)) for k, v in models[variant].state_dict().items()}
    official = official_keys(variant)
    masks = {k for k in official if k.endswith(".fn.fn.mask")}
    assert len(masks) == 6  # the official GroupAttention mask buffers are folded into the op
    assert ours == {k: v for k, v in official.items() if k not in masks}


def test_unknown_variant_lists_valid_names():
    with pytest.raises(ValueError, match="gtpt-s-wholebody"):
        gtpt.build_model("gtpt-xl")
    with pytest.raises(ValueError, match="valid backends"):
        gtpt.build_model("gtpt-t", backend="cuda-magic")
    assert gtpt.get_config("GTPT_S").name == "gtpt-s"


# Token schedule of gtpt-reference.md §1/§5 (attention queries, keys, FFN tokens per group, per layer).
EXPECTED_SCHEDULE = {
    (False, True): [(257, 257, 257)] * 3 + [(257, 257, 196)] + [(196, 196, 196)] * 2
    + [(82, 94, 82)] * 3 + [(82, 94, 31)] + [(31, 43, 31)] * 2,
    (False, False): [(257, 257, 257)] * 3 + [(257, 257, 273)] + [(273, 273, 273)] * 2 + [(262, 274, 262)] * 6,
    (True, True): [(257, 257, 257)] * 3 + [(257, 257, 201)] + [(201, 201, 201)] * 2
    + [(134, 146, 134)] * 3 + [(134, 146, 82)] + [(82, 94, 82)] * 2,
    (True, False): [(257, 257, 257)] * 3 + [(257, 257, 278)] + [(278, 278, 278)] * 2 + [(262, 274, 262)] * 6,
}


@pytest.mark.parametrize("variant", ["gtpt-t", "gtpt-t-wholebody"])
@pytest.mark.parametrize("pruned", [True, False])
def test_token_schedule_matches_reference_and_forward(models, variant, pruned):
    m = models[variant]
    sched = token_schedule(m.cfg, pruned)
    assert [(r.attn_queries, r.attn_keys, r.ffn_tokens) for r in sched] == EXPECTED_SCHEDULE[(m.cfg.wholebody, pruned)]
    seen = []
    tr = m.features.transformer
    hooks = [layer[0].register_forward_pre_hook(lambda mod, a: seen.append(("attn", tuple(a[0].shape))))
             for layer in list(tr.layers) + list(tr.group_layers)]
    hooks += [layer[1].register_forward_pre_hook(lambda mod, a: seen.append(("ffn", tuple(a[0].shape))))
              for layer in list(tr.layers) + list(tr.group_layers)]
    try:
        m.predict(images(1), None if pruned else [1.0] * 12)
    finally:
        for h in hooks:
            h.remove()
    attn = [s for k, s in seen if k == "attn"]
    ffn = [s for k, s in seen if k == "ffn"]
    assert [s[-2] for s in attn] == [r.attn_queries for r in sched]
    assert [s[-2] for s in ffn] == [r.ffn_tokens for r in sched]
    assert [s[1] for s in attn[6:]] == [3] * 6  # the three groups of the fine encoder


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_official_forward_fp64(models, variant):
    """Our forward equals an independent transcription of the official forward (pruned and unpruned paths)."""
    m = models[variant].double()
    try:
        x = images(2, torch.float64, seed=3)
        with torch.no_grad():
            for rates in (m.cfg.keep_rates, (1.0, 1.0, 1.0, 1.0)):
                ours = m.predict(x, [r for r in rates for _ in range(3)])
                ref = official_forward(m, x.clone(), rates)
                for a, b in zip(ours, ref):
                    assert_close(a, b, rtol=1e-9, what=f"{variant} keep={rates}")
    finally:
        m.float()


def test_eval_and_train_outputs():
    torch.manual_seed(0)
    m = gtpt.build_model("gtpt-t", backend="reference")
    m.eval()
    x = images(2)
    with torch.no_grad():
        px, py = m(x)
    assert px.shape == (2, 17, 384) and py.shape == (2, 17, 512)
    m.train()
    calls = []
    h = m.features.stem.register_forward_hook(lambda *a: calls.append(1))
    out = m(x)
    h.remove()
    assert isinstance(out, gtpt.TrainOutput) and len(calls) == 1  # stem once for both passes
    assert out.entire_pred_x.shape == (2, 17, 384) and out.pred_y.shape == (2, 17, 512)
    (out.pred_x.logsumexp(-1).sum() + out.entire_pred_y.logsumexp(-1).sum()).backward()
    grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert m.features.transformer.group_layers[5][0].fn.fn.to_qkv.weight.grad.abs().sum() > 0


def test_outputs_are_deterministic(models):
    m = models["gtpt-t-wholebody"]
    x = images(2)
    with torch.no_grad():
        a, b = m(x), m(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("variant", ["gtpt-t", "gtpt-t-wholebody"])
@pytest.mark.parametrize("pruned", [True, False])
def test_padding_token_never_changes_outputs(models, variant, pruned):
    """Overwrite the padded head-group token with garbage at the fine entry: the outputs do not move."""
    m = models[variant]
    tr = m.features.transformer
    x = images(1)
    rates = None if pruned else [1.0] * 12
    with torch.no_grad():
        clean = m.predict(x, rates)
    original = tr.fine_entry

    def poisoned(*args, **kw):
        seq, pos = original(*args, **kw)
        seq = seq.clone()
        seq[:, 0, 0] = torch.randn_like(seq[:, 0, 0]) * 1e3
        return seq, pos

    tr.fine_entry = poisoned
    try:
        with torch.no_grad():
            dirty = m.predict(x, rates)
    finally:
        del tr.fine_entry
    assert torch.equal(clean[0], dirty[0]) and torch.equal(clean[1], dirty[1])


def test_bad_images_raise_clear_errors(models):
    m = models["gtpt-t"]
    with pytest.raises(ValueError, match=r"\(B, 3, 256, 192\)"):
        m(torch.randn(1, 3, 224, 224))
    with pytest.raises(ValueError, match=r"\(B, 3, 256, 192\)"):
        m(torch.randn(1, 1, 256, 192))
    with pytest.raises(ValueError, match=r"\(B, 3, 256, 192\)"):
        m(torch.randn(3, 256, 192))
    with pytest.raises(TypeError, match="float"):
        m(torch.zeros(1, 3, 256, 192, dtype=torch.uint8))
    with pytest.raises(TypeError, match="float64"):
        m(torch.randn(1, 3, 256, 192, dtype=torch.float64))
    with pytest.raises(ValueError, match="keep rate"):
        m.predict(images(1), [1.0] * 11 + [0.0])


def official_style_state_dict(model):
    """What an official .pth holds: student + 'ema_' copy, with the GroupAttention mask buffers."""
    sd = {}
    for k, v in model.state_dict().items():
        sd[k] = v.clone()
        sd["ema_" + k] = v.clone() + (0.5 if v.is_floating_point() and "running_var" not in k else 0)
    for i in range(6):
        mask = torch.zeros(1, 8, 3, 262, 274, dtype=torch.bool)
        mask[:, :, 0, 0, :] = True
        mask[..., 0] = True
        for prefix in ("", "ema_"):
            sd[f"{prefix}features.transformer.group_layers.{i}.0.fn.fn.mask"] = mask
    return sd


def test_load_official_checkpoint_takes_ema(tmp_path):
    torch.manual_seed(0)
    src = gtpt.build_model("gtpt-t", backend="reference")
    sd = official_style_state_dict(src)
    path = tmp_path / "gtpt_t.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    dst = gtpt.build_model("gtpt-t", backend="reference")
    load_official_checkpoint(dst, str(path))
    for k, v in dst.state_dict().items():
        assert torch.equal(v, sd["ema_" + k]), k
    load_official_checkpoint(dst, sd, use_ema=False)
    assert torch.equal(dst.mlp_head_x[1].weight, sd["mlp_head_x.1.weight"])


def test_checkpoint_errors_list_everything_and_load_nothing(tmp_path):
    torch.manual_seed(0)
    other = official_style_state_dict(gtpt.build_model("gtpt-s", backend="reference"))
    dst = gtpt.build_model("gtpt-t", backend="reference")
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointError, match="looks like gtpt-s") as e:
        load_official_checkpoint(dst, other)
    assert "wrong shape" in str(e.value)
    wb = official_style_state_dict(gtpt.build_model("gtpt-t-wholebody", backend="reference"))
    with pytest.raises(CheckpointError, match="unexpected.*extra_token"):
        load_official_checkpoint(dst, wb)
    partial = official_style_state_dict(dst)
    del partial["ema_mlp_head_y.1.bias"]
    partial["ema_features.bogus"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="missing.*mlp_head_y.1.bias") as e:
        load_official_checkpoint(dst, partial)
    assert "features.bogus" in str(e.value)
    nan = official_style_state_dict(dst)
    nan["ema_mlp_head_x.1.weight"][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="NaN"):
        load_official_checkpoint(dst, nan)
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())

    corrupt = tmp_path / "corrupt.pth"
    good = io.BytesIO()
    torch.save(official_style_state_dict(dst), good)
    corrupt.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_official_checkpoint(dst, str(corrupt))
    # The official training script's per-epoch checkpoint.pth: module.-prefixed state dict, optimizer, and the
    # validation AP as a numpy float ('perf'), which weights_only refuses unless numpy scalars are allowed.
    import numpy as np
    train_ckpt = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 5, "model": "pose_gtpt", "perf": np.float64(0.711), "best": np.float32(0.7),
                "state_dict": {"module." + k: v for k, v in official_style_state_dict(dst).items()}}, train_ckpt)
    load_official_checkpoint(dst, str(train_ckpt))
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": object()}, evil)
    with pytest.raises(CheckpointError):  # weights_only refuses arbitrary pickled objects
        load_official_checkpoint(dst, str(evil))
    with pytest.raises(FileNotFoundError):
        load_official_checkpoint(dst, str(tmp_path / "missing.pth"))


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    save_checkpoint({"a": torch.ones(3)}, path)
    assert torch.equal(torch.load(path)["a"], torch.ones(3))

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError):
        save_checkpoint({"a": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path)["a"], torch.ones(3))  # the old file survives a failed save
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]  # no temp file left behind


def test_atomic_write_gives_the_permissions_of_a_plain_open(tmp_path):
    # mkstemp creates 0600 files; checkpoints and results must be readable as a plain open would leave them
    # (0666 less the umask), e.g. by evaluation jobs of other users on a shared cluster.
    import os
    import stat
    from gtpt.checkpoint import atomic_write
    old = os.umask(0o022)
    try:
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
        with atomic_write(tmp_path / "atomic.txt", "w") as f:
            f.write("x")
        os.umask(0o077)
        with atomic_write(tmp_path / "private.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    mode = lambda name: stat.S_IMODE(os.stat(tmp_path / name).st_mode)  # noqa: E731
    assert mode("atomic.txt") == mode("plain.txt") == 0o644
    assert mode("private.txt") == 0o600


@pytest.mark.gpu
def test_official_mask_check_follows_the_state_dict_device():
    # A state dict torch.load-ed onto a GPU keeps its mask buffers there; the check must not compare across devices.
    from gtpt.checkpoint import _official_group_mask
    m = torch.zeros(1, 3, 8, 8, 8, dtype=torch.bool)
    m[:, :, 0, 0, :] = True
    m[..., 0] = True
    assert _official_group_mask(m) and _official_group_mask(m.cuda())
    m[0, 0, 1, 1, 1] = True
    assert not _official_group_mask(m.cuda())


def test_model_built_and_run_under_inference_mode():
    # Buffers made under torch.inference_mode (e.g. the pruning row masks) have no version counter.
    with torch.inference_mode():
        torch.manual_seed(0)
        model = gtpt.build_model("gtpt-t", backend="reference").eval()
        x, y = model(torch.randn(1, 3, 256, 192))
    assert x.shape == (1, 17, 384) and y.shape == (1, 17, 512) and torch.isfinite(x).all()


def test_config_validation():
    import dataclasses
    from gtpt.config import get_config
    cfg = get_config("gtpt-t")
    assert dataclasses.replace(cfg, keep_rates=[1.0, 0.7, 0.3, 0.1]).keep_rates == (1.0, 0.7, 0.3, 0.1)  # a tuple
    hash(dataclasses.replace(cfg, keep_rates=[1.0, 0.7, 0.3, 0.1]))
    for kw, fragment in [(dict(keep_rates=(1.0, 0.7, 0.3, 1.5)), "keep_rates"),
                         (dict(keep_rates=(1.0, 0.7)), "keep_rates"),
                         (dict(keep_rates=(1.0, -0.7, 0.3, 0.1)), "keep_rates"),
                         (dict(keep_rates=(1.0, 0.3, 0.7, 0.1)), "must not increase"),
                         (dict(num_keypoints=50), "num_keypoints"),
                         (dict(stem="foo"), "stem"),
                         (dict(depth=8), "depth"),
                         (dict(heads=7), "multiple of heads"),
                         (dict(image_size=(250, 192)), "image_size")]:
        with pytest.raises(ValueError, match=fragment):
            dataclasses.replace(cfg, **kw)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dim = 64


def test_cpu_training_attention_through_sdpa_matches_the_reference(monkeypatch, one_thread):
    """Train mode on CPU without the Triton interpreter (simulated: the op resolves to its reference) runs the
    attention through SDPA: same logits and gradients as the reference ops, the padded fine-layer row included;
    an explicit backend="reference", set_fast_training(False), eval mode and FlopCounterMode keep the op."""
    import gtpt.model as model_module
    from gtpt import fast_inference
    from torch.utils.flop_counter import FlopCounterMode

    monkeypatch.setattr(model_module, "resolve_backend", lambda backend, device: "reference")
    calls = []
    orig = fast_inference.sdpa_group_attention
    monkeypatch.setattr(fast_inference, "sdpa_group_attention", lambda *a: calls.append(a[2]) or orig(*a))
    torch.manual_seed(0)
    m = gtpt.build_model("gtpt-t").train()
    x = torch.randn(2, 3, 256, 192, generator=torch.Generator().manual_seed(3))

    def step(backend):
        m.set_backend(backend)
        m.features.transformer.backend = "reference"  # the pruning sites: keep the interpreter out of this test
        m.zero_grad(set_to_none=True)
        outs = m(x)
        sum((o.float().log_softmax(-1) * torch.linspace(-1, 1, o.shape[-1])).sum() for o in outs).backward()
        return [o.detach() for o in outs], {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    ref_out, ref_grad = step("reference")
    assert not calls
    fast_out, fast_grad = step("auto")
    assert len(calls) == 2 * 12 and set(calls) == {0, 6}  # both passes, 6 coarse + 6 fine layers each
    for a, b in zip(fast_out, ref_out):
        assert_close(a, b, rtol=1e-4, what="train-mode logits")
        assert not torch.equal(a, b)  # SDPA did run (fp32 rounding differs)
    assert fast_grad.keys() == ref_grad.keys()
    # A per-channel constant before a train-mode BatchNorm (conv biases, the BN shifts feeding a 1x1 conv + BN)
    # has an exactly-zero gradient in exact arithmetic: both sides hold rounding noise there, so those are only
    # checked to stay noise.
    scale = max(g.abs().max() for g in ref_grad.values())
    for n in ref_grad:
        if ref_grad[n].abs().max() < 1e-5 * scale:
            assert fast_grad[n].abs().max() < 1e-5 * scale, n
        else:
            assert_close(fast_grad[n], ref_grad[n], rtol=1e-3, what=n)
    attn = m.features.transformer.layers[0][0].fn.fn
    qkv = torch.randn(1, 1, 5, 3 * 128)
    assert attn._sdpa_training(qkv)
    m.set_fast_training(False)
    assert not attn._sdpa_training(qkv)
    m.set_fast_training(True).eval()
    assert not attn._sdpa_training(qkv)
    m.train()
    with FlopCounterMode(display=False):
        assert not attn._sdpa_training(qkv)
