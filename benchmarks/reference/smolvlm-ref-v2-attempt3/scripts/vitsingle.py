"""One object per image, drawn fresh: can the Idefics3 vision transformer learn its shape? args: layers patch steps lr size; env INIT=edge: oriented step-edge filters in the patch embedding."""
import sys, time, math, random, torch, torch.nn.functional as F, numpy as np
from transformers import Idefics3VisionConfig
from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionTransformer
from hf_dream.reference.scenes import Scene, SceneObject, SHAPES, COLORS, SIZES
torch.set_num_threads(2); torch.manual_seed(0)
layers, patch, steps, lr, size = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
cfg = Idefics3VisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=layers, num_attention_heads=4, image_size=128, patch_size=patch)
cfg._attn_implementation = "eager"
vit = Idefics3VisionTransformer(cfg); head = torch.nn.Linear(256, 10)
import os
if os.environ.get("INIT") == "edge":  # oriented step-edge filters on luminance and two colour-opponent channels
    w = vit.embeddings.patch_embedding.weight.data; scale = w.flatten(1).norm(dim=1).mean()
    yy, xx = torch.meshgrid(torch.arange(patch) - (patch - 1) / 2, torch.arange(patch) - (patch - 1) / 2, indexing="ij")
    chans = [torch.tensor([1.0, 1, 1]), torch.tensor([1.0, -1, 0]), torch.tensor([0.5, 0.5, -1])]
    k = 0
    for c in chans:
        for o in range(8):
            t = math.pi * o / 8
            for off in (-patch / 4, 0.0, patch / 4):
                f = torch.tanh((xx * math.cos(t) + yy * math.sin(t) - off) / 1.0)
                f = c[:, None, None] * f[None]
                w[k] = f / f.norm() * scale; k += 1
    print("edge filters", k)
params = list(vit.parameters()) + list(head.parameters())
opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / 100))
def batch(rng, n):
    xs, ys = [], []
    for _ in range(n):
        k = rng.randrange(10)
        obj = SceneObject(SHAPES[k], rng.choice(["red", "blue", "green", "yellow"]), size, (1, 1), (rng.uniform(-8, 8), rng.uniform(-8, 8)), rng.uniform(0, 6.28))
        xs.append(np.asarray(Scene(0, "white", "plain", None, (obj,)).draw())); ys.append(k)
    return torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float() / 127.5 - 1, torch.tensor(ys)
rng = random.Random(0); ex, ey = batch(random.Random(1), 256)
t0 = time.time()
for step in range(steps):
    x, y = batch(rng, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = vit(pixel_values=x).last_hidden_state.float().mean(1)
    loss = F.cross_entropy(head(h), y); opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); sched.step()
    if step % 100 == 99:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            acc = (head(vit(pixel_values=ex).last_hidden_state.float().mean(1)).argmax(-1) == ey).float().mean()
        print(f"{os.environ.get('INIT', 'default')} single {size} L{layers} p{patch} lr{lr} step {step+1} loss {loss.item():.3f} eval acc {acc:.3f} {time.time()-t0:.0f}s", flush=True)
