import os, sys, torch, torch.nn.functional as F
from safetensors.torch import load_file
from hf_dream.reference import smolvlm
torch.set_num_threads(2)
text_lm, tok = smolvlm.load_smollm2()
model = smolvlm.assemble(text_lm, tok, smolvlm.SPECS["v2"])
model.load_state_dict({k[4:]: v for k, v in load_file(sys.argv[1]).items()}, strict=False)
vision = model.model.vision_model
pool = torch.load(os.environ.get("POOL_DIR", "/tmp") + "/pool0.pt", mmap=True)
lab = torch.load(os.environ.get("POOL_DIR", "/tmp") + "/labels0.pt")
N = 3000
feats = {l: [] for l in (1, 3, 6)}
with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
    for s in range(0, N, 100):
        px = pool[s:s+100].permute(0, 3, 1, 2).float() / 127.5 - 1
        hs = vision(pixel_values=px, output_hidden_states=True).hidden_states
        for l in feats: feats[l].append(hs[l].float())
m = lab["maps"][:N].long().flatten(1); a = lab["attrs"][:N].long()
obj = (m - 1).clamp(min=0)
shape = torch.where(m > 0, torch.gather(a[..., 0], 1, obj), -1)
# per-object pooled: mean of the object's patches -> shape
for l, f in feats.items():
    X = torch.cat(f)  # N, 256, H
    Xs, ys = [], []
    for k in range(4):
        w = (m == k + 1).float()
        ok = w.sum(1) > 0
        Xs.append((X * w[..., None]).sum(1)[ok] / w.sum(1)[ok][:, None]); ys.append(a[ok, k, 0])
    Xo, yo = torch.cat(Xs), torch.cat(ys)
    Xp, yp = X[shape >= 0], shape[shape >= 0]
    for name, (Xa, ya) in {"patch": (Xp, yp), "object-mean": (Xo, yo)}.items():
        n = len(ya); tr = int(n * 0.8)
        mu, sd = Xa[:tr].mean(0), Xa[:tr].std(0) + 1e-5
        Xa = (Xa - mu) / sd
        head = torch.nn.Linear(Xa.shape[1], 10); opt = torch.optim.Adam(head.parameters(), 1e-2)
        for it in range(300):
            idx = torch.randint(0, tr, (2048,))
            loss = F.cross_entropy(head(Xa[idx]), ya[idx]); opt.zero_grad(); loss.backward(); opt.step()
        acc = (head(Xa[tr:]).argmax(-1) == ya[tr:]).float().mean()
        print(f"layer {l} {name}: linear shape probe held-out acc {acc:.3f} (n={n})", flush=True)
