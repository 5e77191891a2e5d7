"""Shape warm-up of the smolvlm-ref v2 vision tower (6 layers, the package's spec) before the transcript stage.

Objective at the last vision layer: each object's mean patch -> its shape (10), plus per patch -> the shape / colour of
the object under it (background a class of its own). AdamW, warmup 200, constant, cosine to 10% over the last 40%.
Saves `vlm.model.vision_model.*` (the key format `transcribe5.py` and `--init-weights` read) + optimizer state every 250
steps; rerun the same command to resume. args: steps out_dir. env LR (1e-4) BS (32) THREADS (2) POOL_DIR POOLS (4)."""
import math, os, sys, time, dataclasses, torch, torch.nn.functional as F
from safetensors.torch import save_file
from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionTransformer
from hf_dream.reference import smolvlm
torch.set_num_threads(int(os.environ.get("THREADS", "2"))); torch.manual_seed(0)
steps, out = int(sys.argv[1]), sys.argv[2]
os.makedirs(out, exist_ok=True)
lr, bs = float(os.environ.get("LR", "1e-4")), int(os.environ.get("BS", "32"))
spec = smolvlm.SPECS["v2"]
cfg = spec.vision_config()
cfg._attn_implementation = "sdpa"
vit = Idefics3VisionTransformer(cfg)
pd = os.environ.get("POOL_DIR", "/work/exp/v3"); P = int(os.environ.get("POOLS", "4"))
pool = torch.cat([torch.load(f"{pd}/pool{k}.pt", mmap=True) for k in range(P)])
labs = [torch.load(f"{pd}/labels{k}.pt") for k in range(P)]
MAPS = torch.cat([l["maps"] for l in labs]).long().flatten(1); ATTRS = torch.cat([l["attrs"] for l in labs]).long()
N = pool.shape[0]; EV = torch.arange(N - 512, N); NT = N - 512
H = spec.hidden_size
heads = torch.nn.ModuleDict({"obj": torch.nn.Linear(H, 10), "shape": torch.nn.Linear(H, 11), "color": torch.nn.Linear(H, 13)})
params = list(vit.parameters()) + list(heads.parameters())
opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05, betas=(0.9, 0.98))
def factor(s):
    w = min(1.0, (s + 1) / 200); c = 0.6 * steps
    return w * (1.0 if s < c else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - c) / (steps - c))))
sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
start = 0
ck = f"{out}/resume.pt"
if os.path.exists(ck):
    st = torch.load(ck); vit.load_state_dict(st["vit"]); heads.load_state_dict(st["heads"]); opt.load_state_dict(st["opt"]); sched.load_state_dict(st["sched"]); start = st["step"]
    print("resumed at", start, flush=True)
def run(idx):
    px = pool[idx].permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = vit(pixel_values=px).last_hidden_state.float()
    m, a = MAPS[idx], ATTRS[idx]
    X, Y = [], []
    for k in range(4):
        w = (m == k + 1).float(); ok = w.sum(1) > 0
        X.append((h * w[..., None]).sum(1)[ok] / w.sum(1)[ok][:, None]); Y.append(a[ok, k, 0])
    X, Y = torch.cat(X), torch.cat(Y)
    lo = heads["obj"](X)
    obj = (m - 1).clamp(min=0)
    g = lambda j, bg: torch.where(m > 0, torch.gather(a[..., j], 1, obj), torch.full_like(m, bg))
    pw = torch.where(m > 0, 1.0, 0.2).flatten()
    dense = sum((F.cross_entropy(heads[k](h).flatten(0, 1), g(j, bg).flatten(), reduction="none") * pw).sum() / pw.sum()
                for k, j, bg in (("shape", 0, 10), ("color", 1, 12)))
    ps = heads["shape"](h).argmax(-1); on = m > 0
    return F.cross_entropy(lo, Y) + dense, (lo.argmax(-1) == Y).float().mean().item(), (ps[on] == g(0, 10)[on]).float().mean().item()
gen = torch.Generator().manual_seed(1234 + start)
t0 = time.time()
for step in range(start, steps):
    loss, acc, _ = run(torch.randint(0, NT, (bs,), generator=gen))
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); sched.step()
    if (step + 1) % 250 == 0 or step + 1 == steps:
        with torch.no_grad():
            r = [run(EV[i:i + 128]) for i in range(0, 512, 128)]
        ea, ep = sum(x[1] for x in r) / len(r), sum(x[2] for x in r) / len(r)
        print(f"step {step+1} lr {sched.get_last_lr()[0]:.2e} loss {loss.item():.3f} train obj acc {acc:.3f} held-out obj shape acc {ea:.3f} per-patch {ep:.3f} {time.time()-t0:.0f}s", flush=True)
        save_file({"vlm.model.vision_model." + k: v.detach().float().contiguous() for k, v in vit.state_dict().items()}, f"{out}/tower.safetensors")
        torch.save({"vit": vit.state_dict(), "heads": heads.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step + 1}, ck + ".tmp")
        os.replace(ck + ".tmp", ck)
print("done", flush=True)
