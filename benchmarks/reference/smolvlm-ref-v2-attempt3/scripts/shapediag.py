import sys, dataclasses, torch, torch.nn.functional as F, collections
from safetensors.torch import load_file
from hf_dream.reference import smolvlm
from hf_dream.reference.scenes import scene_from_seed, EVAL, SHAPES
from hf_dream.reference.transcripts import TranscriptLayout
torch.set_num_threads(2)
ckpt = sys.argv[1]
text_lm, tok = smolvlm.load_smollm2()
spec = smolvlm.SPECS["v2"]
proc = smolvlm.build_processor(tok, spec)
model = smolvlm.assemble(text_lm, tok, spec)
st = {k[4:] if k.startswith("vlm.") else k: v for k, v in load_file(ckpt).items()}
missing = model.load_state_dict(st, strict=False)
E = model.get_input_embeddings().weight.detach()
text_ids = lambda s: tok(s, add_special_tokens=False).input_ids
lay = TranscriptLayout.for_tokenizer(text_ids, 64)
print(lay)
scenes = [scene_from_seed(EVAL.seed(300_000 + i)) for i in range(256)]
px = torch.stack([proc.image_processor([[sc.draw()]], return_tensors="pt")["pixel_values"][0][0] for sc in scenes])
y = torch.tensor([lay.ids(text_ids, sc) for sc in scenes])
vocab = torch.tensor(sorted(set(y.flatten().tolist())))
with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
    o = model.model.connector(model.model.vision_model(pixel_values=px).last_hidden_state).float()
nearest = vocab[(F.normalize(o, dim=-1) @ F.normalize(E[vocab], dim=-1).T).argmax(-1)]
shape_ids = {tok(" "+s, add_special_tokens=False).input_ids[0]: s for s in SHAPES}
for slot in range(lay.slots):
    conf = collections.Counter(); right = n = 0
    for i, sc in enumerate(scenes):
        if len(sc.objects) <= slot: continue
        base = lay.count_width + slot * lay.object_width
        pos = base + (4 if sc.objects[slot].color == "teal" else 3)
        t, p = int(y[i, pos]), int(nearest[i, pos])
        assert t in shape_ids, tok.decode([t])
        n += 1; right += t == p
        conf[(shape_ids[t], shape_ids.get(p, tok.decode([p])))] += 1
    print(f"slot {slot}: shape acc {right/n:.2f} over {n}")
    if slot == 0:
        for s in SHAPES:
            row = {p: c for (t, p), c in conf.items() if t == s}
            print("  ", s, row)
