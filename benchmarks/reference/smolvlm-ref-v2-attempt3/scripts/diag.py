import sys, dataclasses, torch, torch.nn.functional as F
sys.path.insert(0, "benchmarks/reference/smolvlm-ref-v2-attempt3/scripts")
from layouts import layout
from safetensors.torch import load_file
from hf_dream.reference import smolvlm
from hf_dream.reference.scenes import scene_from_seed, EVAL
torch.set_num_threads(1)
ckpt, mode, layers = sys.argv[1], sys.argv[2], int(sys.argv[3])
text_lm, tok = smolvlm.load_smollm2()
spec = dataclasses.replace(smolvlm.SPECS["v2"], num_hidden_layers=layers)
proc = smolvlm.build_processor(tok, spec)
model = smolvlm.assemble(text_lm, tok, spec)
st = {k[4:]: v for k, v in load_file(ckpt).items() if k.startswith("vlm.")}
model.load_state_dict(st, strict=False)
E = model.get_input_embeddings().weight.detach()
scenes = [scene_from_seed(EVAL.seed(300_000 + i)) for i in range(128)]
px = torch.stack([proc.image_processor([[sc.draw()]], return_tensors="pt")["pixel_values"][0][0] for sc in scenes])
y = torch.tensor([layout(tok, sc, mode) for sc in scenes])
vocab = torch.tensor(sorted(set(y.flatten().tolist())))
with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
    o = model.model.connector(model.model.vision_model(pixel_values=px).last_hidden_state).float()
nearest = vocab[(F.normalize(o, dim=-1) @ F.normalize(E[vocab], dim=-1).T).argmax(-1)]
right = (nearest == y).float()
print("per position acc:", " ".join(f"{a:.2f}" for a in right.mean(0).tolist()))
for i in range(4):
    print("T:", repr(tok.decode(y[i]))); print("P:", repr(tok.decode(nearest[i])))
