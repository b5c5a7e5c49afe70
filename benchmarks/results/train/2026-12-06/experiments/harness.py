import sys, time, argparse, torch, numpy as np, math
sys.path.insert(0, "/work/wt-synth")
from gtpt.data import TopDownDataset
from gtpt.model import build_model
from gtpt.loss import GlobalPerceivedLoss
p = argparse.ArgumentParser()
p.add_argument("--lr", type=float, default=3e-3); p.add_argument("--steps", type=int, default=150)
p.add_argument("--data", default="/tmp/synthx/cache/synth-easy-264-07f0a2ff5a  # the pre-marker easy set; --data for another")
p.add_argument("--ntrain", type=int, default=100000); p.add_argument("--bs", type=int, default=8)
p.add_argument("--warmup", type=int, default=20); p.add_argument("--sigma", type=float, default=4.0)
p.add_argument("--every", type=int, default=15); p.add_argument("--kpstd", type=float, default=1.0)
p.add_argument("--stemlr", type=float, default=1); p.add_argument("--headlr", type=float, default=1)
p.add_argument("--stdinit", action="store_true"); p.add_argument("--b2", type=float, default=0.999)
p.add_argument("--aug", default="none"); p.add_argument("--pegain", type=float, default=1.0); p.add_argument("--qkgain", type=float, default=1.0); p.add_argument("--threads", type=int, default=1); p.add_argument("--teacher_only", action="store_true")
a = p.parse_args(); print(vars(a), flush=True); torch.set_num_threads(a.threads)
def load(split, n):
    ds = TopDownDataset(f"{a.data}/annotations/person_keypoints_{split}.json", f"{a.data}/images/{split}", train=False, sigma=a.sigma)
    items = [ds[i] for i in range(min(n, len(ds)))]
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in ("image", "target_x", "target_y", "target_weight")}
t0 = time.time(); tr = load("train", a.ntrain); va = load("val", 48); print("loaded", time.time() - t0, tr["image"].shape, flush=True)
from gtpt.train import AUGMENTATIONS
tds = TopDownDataset(f"{a.data}/annotations/person_keypoints_train.json", f"{a.data}/images/train", train=True, sigma=a.sigma, flip=False, **AUGMENTATIONS.get(a.aug, AUGMENTATIONS["none"]))
torch.manual_seed(0)
m = build_model("gtpt-t"); crit = GlobalPerceivedLoss()
if a.stdinit:
    for mod in m.modules():
        if isinstance(mod, torch.nn.Conv2d): mod.reset_parameters()
torch.nn.init.normal_(m.features.keypoint_token, std=a.kpstd)
torch.nn.init.constant_(m.features.patch2emb_norm.weight, a.pegain)
from gtpt.model import Attention
with torch.no_grad():
    for mod in m.modules():
        if isinstance(mod, Attention): mod.to_qkv.weight[:2 * mod.to_qkv.in_features] *= a.qkgain
stem = [q for n, q in m.named_parameters() if n.startswith("features.stem") and q.requires_grad]
head = [q for n, q in m.named_parameters() if n.startswith("mlp_head")]
ids = {id(q) for q in stem + head}
rest = [q for q in m.parameters() if q.requires_grad and id(q) not in ids]
opt = torch.optim.Adam([{"params": rest, "mult": 1.0}, {"params": stem, "mult": a.stemlr}, {"params": head, "mult": a.headlr}], a.lr, betas=(0.9, a.b2))
def dec(px, py): return torch.stack([px.argmax(-1).float() / 2, py.argmax(-1).float() / 2], -1)
gt = lambda d: dec(d["target_x"], d["target_y"])
def err(model, d, n=48):
    model.eval()
    with torch.no_grad():
        s = dec(*model(d["image"][:n])); t = dec(*model.predict(d["image"][:n], [1.0] * 12))
    model.train()
    bns = [b for b in model.modules() if isinstance(b, torch.nn.modules.batchnorm._BatchNorm)]
    for b in bns: b.momentum = 0.0
    with torch.no_grad():
        outs = [model(d["image"][i:i + 8]) for i in range(0, n, 8)]
    for b in bns: b.momentum = 0.1
    bs_ = dec(torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]))
    w = d["target_weight"][:n] > 0; g = gt(d)[:n]
    f = lambda q: ((q - g).norm(dim=-1) / 256)[w].mean().item()
    return f(s), f(t), f(bs_)
mean = (gt(tr) * tr["target_weight"][..., None]).sum(0) / tr["target_weight"].sum(0)[:, None]
vw = va["target_weight"] > 0
print("mean-pose val err %.4f" % ((gt(va) - mean).norm(dim=-1) / 256)[vw].mean().item(), flush=True)
g = torch.Generator().manual_seed(0); n = tr["image"].shape[0]; perm = torch.randperm(n, generator=g); pos = 0
m.train(); t0 = time.time(); run = []
for step in range(1, a.steps + 1):
    if pos + a.bs > n: perm = torch.randperm(n, generator=g); pos = 0
    idx = perm[pos:pos + a.bs]; pos += a.bs
    for gr in opt.param_groups: gr["lr"] = gr["mult"] * a.lr * min(1, step / max(1, a.warmup))
    if a.aug == "none":
        b = {k: tr[k][idx] for k in tr}
    else:
        if pos == a.bs: tds.set_epoch(step)
        its = [tds[int(i)] for i in idx]
        b = {k: torch.stack([it[k] for it in its]) for k in ("image", "target_x", "target_y", "target_weight")}
    out = m(b["image"]); loss = crit(out, b["target_x"], b["target_y"], b["target_weight"])
    opt.zero_grad(); loss.backward(); opt.step(); run.append(loss.item())
    if step % a.every == 0:
        v = err(m, va); t = err(m, tr, 24)
        print(f"step {step} loss {np.mean(run[-a.every:]):.5f} val s/t/bn {v[0]:.4f} {v[1]:.4f} {v[2]:.4f} train s/t/bn {t[0]:.4f} {t[1]:.4f} {t[2]:.4f} t {time.time() - t0:.0f}s", flush=True)
