"""Shape classification alone on the pre-rendered scene pool (mean of each object's patches -> 10 shapes). args: layers patch steps lr; env POOL_DIR."""
import sys, time, torch, torch.nn.functional as F, dataclasses, os
from hf_dream.reference import smolvlm
from transformers import Idefics3VisionConfig
from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionTransformer
torch.set_num_threads(2); torch.manual_seed(0)
layers, patch, steps, lr = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
cfg = Idefics3VisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=layers, num_attention_heads=4, image_size=128, patch_size=patch)
cfg._attn_implementation = "eager"
vit = Idefics3VisionTransformer(cfg)
pool = torch.load(os.environ.get("POOL_DIR", "/tmp") + "/pool0.pt", mmap=True); lab = torch.load(os.environ.get("POOL_DIR", "/tmp") + "/labels0.pt")
m16 = lab["maps"].long(); a = lab["attrs"].long()
g = 128 // patch
def masks(idx):
    m = m16[idx]  # B,16,16 at 8px
    if g != 16: m = F.interpolate(m[:, None].float(), size=(g, g), mode="nearest")[:, 0].long()
    return m.flatten(1)
head = torch.nn.Linear(256, 10)
params = list(vit.parameters()) + list(head.parameters())
opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
import math
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / 200) * 0.5 * (1 + math.cos(math.pi * min(1, s / steps))))
N = pool.shape[0]; ev = torch.arange(N - 1000, N)
def batch_loss(idx, train=True):
    px = pool[idx].permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = vit(pixel_values=px).last_hidden_state.float()
    m = masks(idx); X, Y = [], []
    for k in range(4):
        w = (m == k + 1).float(); ok = w.sum(1) > 0
        X.append((h * w[..., None]).sum(1)[ok] / w.sum(1)[ok][:, None]); Y.append(a[idx][ok, k, 0])
    logits = head(torch.cat(X)); Y = torch.cat(Y)
    return F.cross_entropy(logits, Y), (logits.argmax(-1) == Y).float().mean()
t0 = time.time()
for step in range(steps):
    idx = torch.randint(0, N - 1000, (32,))
    loss, acc = batch_loss(idx)
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); sched.step()
    if step % 250 == 249:
        with torch.no_grad(): _, eacc = batch_loss(ev[:256])
        print(f"L{layers} p{patch} step {step+1} loss {loss.item():.3f} eval shape acc {eacc:.3f} {time.time()-t0:.0f}s", flush=True)
