import sys, time, argparse, torch, numpy as np
sys.path.insert(0, "/work/main")
from gtpt.data import TopDownDataset
from gtpt.model import build_model
from gtpt.loss import GlobalPerceivedLoss
p = argparse.ArgumentParser()
p.add_argument("--lr", type=float, default=1e-3); p.add_argument("--steps", type=int, default=60)
p.add_argument("--ntrain", type=int, default=216); p.add_argument("--bs", type=int, default=8)
p.add_argument("--clip", type=float, default=0); p.add_argument("--warmup", type=int, default=10)
p.add_argument("--sigma", type=float, default=4.0); p.add_argument("--every", type=int, default=10)
p.add_argument("--kpstd", type=float, default=0); p.add_argument("--kplr", type=float, default=1); p.add_argument("--opt", default="adam"); p.add_argument("--wd", type=float, default=0.0)
a = p.parse_args(); print(vars(a), flush=True); torch.set_num_threads(1)
D = "/tmp/synth_final_cache/synth-easy-264-07f0a2ff5a"
def load(split, n):
    ds = TopDownDataset(f"{D}/annotations/person_keypoints_{split}.json", f"{D}/images/{split}", train=False, sigma=a.sigma)
    items = [ds[i] for i in range(min(n, len(ds)))]
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in ("image", "target_x", "target_y", "target_weight")}
t0 = time.time(); tr = load("train", a.ntrain); va = load("val", 48); print("loaded", time.time() - t0, tr["image"].shape, flush=True)
torch.manual_seed(0)
m = build_model("gtpt-t"); crit = GlobalPerceivedLoss()
if a.kpstd: torch.nn.init.normal_(m.features.keypoint_token, std=a.kpstd)
kp = [m.features.keypoint_token]; rest = [q for n, q in m.named_parameters() if n != "features.keypoint_token"]
groups = [{"params": rest, "mult": 1.0}, {"params": kp, "mult": a.kplr}]
opt = torch.optim.Adam(groups, a.lr)
def err(model, d):
    model.eval()
    with torch.no_grad():
        out = model(d["image"]); px, py = out[0], out[1]
    model.train()
    x = px.argmax(-1).float() / 2; y = py.argmax(-1).float() / 2
    gx = d["target_x"].argmax(-1).float() / 2; gy = d["target_y"].argmax(-1).float() / 2
    w = d["target_weight"] > 0
    e = ((x - gx) ** 2 + (y - gy) ** 2).sqrt() / 256
    spread = torch.stack([x, y], -1).float().std(1).mean().item()  # joints' spread within a figure
    return e[w].mean().item(), spread
# mean-pose baseline on val: predict the train mean of GT bin positions
gx = tr["target_x"].argmax(-1).float().mean(0) / 2; gy = tr["target_y"].argmax(-1).float().mean(0) / 2
vx = va["target_x"].argmax(-1).float() / 2; vy = va["target_y"].argmax(-1).float() / 2
print("mean-pose val err %.4f" % (((vx - gx) ** 2 + (vy - gy) ** 2).sqrt() / 256)[va["target_weight"] > 0].mean().item())
g = torch.Generator().manual_seed(0); n = tr["image"].shape[0]; perm = torch.randperm(n, generator=g); pos = 0
m.train(); t0 = time.time(); run = []
for step in range(1, a.steps + 1):
    if pos + a.bs > n: perm = torch.randperm(n, generator=g); pos = 0
    idx = perm[pos:pos + a.bs]; pos += a.bs
    for gr in opt.param_groups: gr["lr"] = gr["mult"] * a.lr * min(1, step / max(1, a.warmup))
    out = m(tr["image"][idx]); loss = crit(out, tr["target_x"][idx], tr["target_y"][idx], tr["target_weight"][idx])
    opt.zero_grad(); loss.backward()
    if a.clip: torch.nn.utils.clip_grad_norm_(m.parameters(), a.clip)
    opt.step(); run.append(loss.item())
    if step % a.every == 0:
        print(f"step {step} loss {np.mean(run[-a.every:]):.5f} val_err,spread {err(m, va)} t {time.time() - t0:.0f}s", flush=True)
