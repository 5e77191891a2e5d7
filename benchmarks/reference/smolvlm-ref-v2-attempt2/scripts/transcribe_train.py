"""Vision-only stage: image tokens trained to BE the embeddings of the scene's description (canonical object order,
then spaces), so the frozen text model reads the picture as it reads the words. No text-model forward: cheap."""
import sys, time, math, torch, torch.nn.functional as F
from safetensors.torch import load_file, save_file
from hf_dream.reference import smolvlm
from hf_dream.reference.scenes import scene_from_seed, TRAIN, EVAL, NUMBER_WORDS
torch.set_num_threads(2)
steps, out_path, init = int(sys.argv[1]), sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None
text_lm, tok = smolvlm.load_smollm2()
spec = smolvlm.SPECS["v2"]
proc = smolvlm.build_processor(tok, spec)
model = smolvlm.assemble(text_lm, tok, spec)
del text_lm
if init:
    st = {k[4:]: v for k, v in load_file(init).items() if k.startswith("vlm.")}
    model.load_state_dict(st, strict=False)
vision, connector = model.model.vision_model, model.model.connector
E = model.get_input_embeddings().weight.detach().clone()
space = tok(" ", add_special_tokens=False)["input_ids"][0]
def description_ids(scene):
    objs = sorted(scene.objects, key=lambda o: (o.cell[1], o.cell[0]))
    things = [f"a {o.size} {o.color} {o.shape} {o.place}" for o in objs]
    n = len(objs)
    s = f"The picture has {scene.background_phrase()}. " + (f"There is one object: {things[0]}." if n == 1 else
        f"There are {NUMBER_WORDS[n]} objects: " + ", ".join(things[:-1]) + f" and {things[-1]}.")
    ids = tok(s, add_special_tokens=False)["input_ids"][:64]
    return ids + [space] * (64 - len(ids))
# candidate vocabulary: every token of many transcripts
vocab = sorted({t for i in range(20000) for t in description_ids(scene_from_seed(TRAIN.seed(8_000_000 + i)))})
vocab_t = torch.tensor(vocab); index = {t: k for k, t in enumerate(vocab)}
Ev = E[vocab_t]
scale = E.std().item()
print("candidate vocab", len(vocab), "embedding std", scale, flush=True)
def batch(seeds):
    scenes = [scene_from_seed(s) for s in seeds]
    px = torch.stack([proc.image_processor([[sc.draw()]], return_tensors="pt")["pixel_values"][0][0] for sc in scenes])
    ids = torch.tensor([[index[t] for t in description_ids(sc)] for sc in scenes])
    return px, ids
def tokens(px):
    return connector(vision(pixel_values=px).last_hidden_state)
params = list(vision.parameters()) + list(connector.parameters())
for p in model.parameters(): p.requires_grad_(False)
for p in params: p.requires_grad_(True)
opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, betas=(0.9, 0.98))
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(1, s / steps))))
evx, evy = batch([EVAL.seed(300_000 + i) for i in range(64)])
bs, t0 = 32, time.time()
for step in range(steps):
    px, y = batch([TRAIN.seed(8_000_000 + step * bs + k) for k in range(bs)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tokens(px).float()
    logits = (out @ Ev.T) / (scale * scale * out.shape[-1]) ** 0.5 * 4
    ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    mse = F.mse_loss(out, Ev[y]) / (scale * scale)
    loss = ce + mse
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); sched.step()
    if step % 100 == 0 or step == steps - 1:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            o = tokens(evx).float()
        nearest = (F.normalize(o, dim=-1) @ F.normalize(Ev, dim=-1).T).argmax(-1)
        acc = (nearest == evy).float().mean().item()
        nonspace = evy != index[space]
        acc_ns = (nearest == evy)[nonspace].float().mean().item()
        print(f"step {step} ce {ce.item():.3f} mse {mse.item():.3f} eval token acc {acc:.3f} (non-space {acc_ns:.3f}) {time.time()-t0:.0f}s", flush=True)
state = {"vlm." + k: v.detach().float().contiguous() for k, v in model.state_dict().items() if k.startswith(("model.vision_model.", "model.connector."))}
save_file(state, out_path)
print("saved", out_path)
