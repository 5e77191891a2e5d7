"""Vision-only transcription from a pre-rendered pool + dense per-patch heads at a middle layer (LAST=1: also at the last layer; SHAPE_W: weight of the shape words; attempt 4 added VISION_LR, the vision tower's own peak rate (default LR), and OBJ_W, an object-mean shape head at the last layer (default 0: off)). args: steps out layout layers [init]. env THREADS LR BS SPACE_W DENSE_W LAST SHAPE_W VISION_LR OBJ_W"""
import os, sys, time, math, dataclasses, torch, torch.nn.functional as F
sys.path.insert(0, "benchmarks/reference/smolvlm-ref-v2-attempt3/scripts")
from layouts import layout
from safetensors.torch import load_file, save_file
from hf_dream.reference import smolvlm
from hf_dream.reference.scenes import scene_from_seed, TRAIN, EVAL
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
steps, out_path, mode, layers = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
init = sys.argv[5] if len(sys.argv) > 5 else None
lr, bs, space_w = float(os.environ.get("LR", "1e-3")), int(os.environ.get("BS", "32")), float(os.environ.get("SPACE_W", "0.2"))
text_lm, tok = smolvlm.load_smollm2()
spec = dataclasses.replace(smolvlm.SPECS["v2"], num_hidden_layers=layers)
model = smolvlm.assemble(text_lm, tok, spec)
del text_lm
if init:
    st = {k[4:]: v for k, v in load_file(init).items() if k.startswith("vlm.")}
    print(model.load_state_dict(st, strict=False).unexpected_keys)
vision, connector = model.model.vision_model, model.model.connector
E = model.get_input_embeddings().weight.detach().clone()
space = tok(" ", add_special_tokens=False)["input_ids"][0]
labels = [torch.load(os.environ.get("POOL_DIR", "/tmp") + f"/labels{k}.pt") for k in range(int(os.environ.get("POOLS", "4")))]
MAPS = torch.cat([l['maps'] for l in labels]).long(); ATTRS = torch.cat([l['attrs'] for l in labels]).long()
pool = torch.cat([torch.load(os.environ.get("POOL_DIR", "/tmp") + f"/pool{k}.pt") for k in range(int(os.environ.get("POOLS", "4")))])
N = pool.shape[0]
all_ids = [layout(tok, scene_from_seed(TRAIN.seed(8_000_000 + i)), mode) for i in range(N)]
vocab = sorted({t for ids in all_ids for t in ids})
index = {t: k for k, t in enumerate(vocab)}
Y = torch.tensor([[index[t] for t in ids] for ids in all_ids])
Ev = E[torch.tensor(vocab)]
scale = E.std().item()
print("pool", N, "candidate vocab", len(vocab), flush=True)
def pixels(u8):
    return u8.permute(0, 3, 1, 2).float() / 127.5 - 1
import numpy as np
ev_scenes = [scene_from_seed(EVAL.seed(300_000 + i)) for i in range(128)]
evx = pixels(torch.from_numpy(np.stack([np.asarray(s.draw()) for s in ev_scenes])))
evy = torch.tensor([[index.get(t, 0) for t in layout(tok, s, mode)] for s in ev_scenes])
MID = int(os.environ.get("MID", str(layers // 2)))
DENSE_W = float(os.environ.get("DENSE_W", "1.0"))
hidden = vision.config.hidden_size
LAST = int(os.environ.get("LAST", "0")); SHAPE_W = float(os.environ.get("SHAPE_W", "1"))
mk = lambda: torch.nn.ModuleDict({"rank": torch.nn.Linear(hidden, 5), "shape": torch.nn.Linear(hidden, 11), "color": torch.nn.Linear(hidden, 13), "size": torch.nn.Linear(hidden, 4)})
heads = mk(); lheads = mk(); objhead = torch.nn.Linear(hidden, 10)
OBJ_W = float(os.environ.get('OBJ_W', '0')); VISION_LR = float(os.environ.get('VISION_LR', str(lr)))
from hf_dream.reference.scenes import SHAPES
shape_idx = torch.tensor([index[tok(" "+s_, add_special_tokens=False).input_ids[0]] for s_ in SHAPES])
is_shape = torch.zeros(len(vocab), dtype=torch.bool); is_shape[shape_idx] = True
def tokens(px, dense=False):
    out = vision(pixel_values=px, output_hidden_states=dense)
    t = connector(out.last_hidden_state)
    return (t, out.hidden_states[MID], out.last_hidden_state) if dense else t
def dense_targets(idx):
    m = MAPS[idx].flatten(1)  # [B, 256] 0 = bg, k+1
    a = ATTRS[idx]  # [B, 4, 3]
    obj = (m - 1).clamp(min=0)
    g = lambda j, bg: torch.where(m > 0, torch.gather(a[..., j], 1, obj), torch.full_like(m, bg))
    return {"rank": torch.where(m > 0, m - 1, 4), "shape": g(0, 10), "color": g(1, 12), "size": g(2, 3)}
params = list(vision.parameters()) + list(connector.parameters()) + list(heads.parameters()) + list(lheads.parameters()) + list(objhead.parameters())
for p in model.parameters(): p.requires_grad_(False)
for p in params: p.requires_grad_(True)
print("trainable", sum(p.numel() for p in params), flush=True)
opt = torch.optim.AdamW([{'params': list(vision.parameters()) + list(heads.parameters()) + list(lheads.parameters()) + list(objhead.parameters()), 'lr': VISION_LR}, {'params': list(connector.parameters()), 'lr': lr}], weight_decay=0.01, betas=(0.9, 0.98))
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(1, s / steps))))
g = torch.Generator().manual_seed(0)
t0 = time.time()
for step in range(steps):
    idx = torch.randint(0, N, (bs,), generator=g)
    px, y = pixels(pool[idx]), Y[idx]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, mid, last = tokens(px, dense=True)
        out = out.float()
    dt = dense_targets(idx)
    patch_w = torch.where(dt["rank"] < 4, 1.0, 0.2).flatten()
    dense = sum((F.cross_entropy(heads[k](mid.float()).flatten(0, 1), dt[k].flatten(), reduction="none") * patch_w).sum() / patch_w.sum() for k in heads)
    if LAST: dense = dense + sum((F.cross_entropy(lheads[k](last.float()).flatten(0, 1), dt[k].flatten(), reduction="none") * patch_w).sum() / patch_w.sum() for k in heads)
    logits = (out @ Ev.T) / (scale * scale * out.shape[-1]) ** 0.5 * 4
    w = torch.where(y == index[space], space_w, 1.0)
    w = torch.where(is_shape[y], SHAPE_W, w)
    ce = (F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none") * w.flatten()).sum() / w.sum()
    mse = ((out - Ev[y]) ** 2).mean(-1).mul(w).sum() / w.sum() / (scale * scale)
    if OBJ_W:
        m = MAPS[idx].flatten(1); X, Yo = [], []
        for k in range(4):
            ww = (m == k + 1).float(); ok = ww.sum(1) > 0
            X.append((last.float() * ww[..., None]).sum(1)[ok] / ww.sum(1)[ok][:, None]); Yo.append(ATTRS[idx][ok, k, 0])
        lo = objhead(torch.cat(X)); Yo = torch.cat(Yo); dense = dense + OBJ_W / max(DENSE_W, 1e-9) * F.cross_entropy(lo, Yo)
    loss = ce + mse + DENSE_W * dense
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); sched.step()
    if step % 250 == 0 or step == steps - 1:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            o = tokens(evx).float()
        nearest = (F.normalize(o, dim=-1) @ F.normalize(Ev, dim=-1).T).argmax(-1)
        right = nearest == evy
        ns = evy != index[space]
        print(f"step {step} dense {dense.item():.3f} ce {ce.item():.3f} mse {mse.item():.3f} acc {right.float().mean():.3f} non-space {right[ns].float().mean():.3f} "
              f"shape {right[is_shape[evy]].float().mean():.3f} first17 exact {right[:, :17].all(-1).float().mean():.3f} all exact {right.all(-1).float().mean():.3f} {time.time()-t0:.0f}s", flush=True)
        state = {"vlm." + k: v.detach().float().contiguous() for k, v in model.state_dict().items() if k.startswith(("model.vision_model.", "model.connector."))}
        save_file(state, out_path)
print("saved", out_path)
