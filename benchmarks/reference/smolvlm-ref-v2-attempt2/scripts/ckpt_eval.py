"""Quick grounding / easy-VQA check of a vision-training checkpoint (experiment helper, not package code)."""
import sys, random, torch
from safetensors.torch import load_file
from hf_dream.reference import smolvlm, easy_vqa
from hf_dream.reference.quality import generate, names_object, main_object
from hf_dream.reference.scenes import scene_from_seed, EVAL
from hf_dream.reference.instructions import instruction_for
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
ckpt = sys.argv[1]
text_lm, tok = smolvlm.load_smollm2()
spec = smolvlm.SPECS["v2"]
proc = smolvlm.build_processor(tok, spec)
model = smolvlm.assemble(text_lm, tok, spec)
state = load_file(ckpt)
vstate = {k[len("vlm."):]: v for k, v in state.items() if k.startswith("vlm.")}
missing, unexpected = model.load_state_dict(vstate, strict=False)
assert not unexpected, unexpected
model.eval()
n = 24
few = [scene_from_seed(EVAL.seed(100_000 + i), max_objects=2) for i in range(n)]
describe = [instruction_for(s, random.Random(i), split="heldout", kind="describe")[1] for i, s in enumerate(few)]
dec = lambda ids: tok.decode(ids, skip_special_tokens=True)
for label, shown in (("real", few), ("other", few[1:] + few[:1])):
    ids = generate(model, proc, describe, [s.draw() for s in shown], 64, 8, progress=False)
    hits = [names_object(dec(x), main_object(s).color, main_object(s).shape) for s, x in zip(few, ids)]
    col = [main_object(s).color in dec(x).lower() for s, x in zip(few, ids)]
    shp = [main_object(s).shape in dec(x).lower() for s, x in zip(few, ids)]
    print(label, "named", sum(hits) / n, "colour", sum(col) / n, "shape", sum(shp) / n, flush=True)
    if label == "real":
        for s, x in list(zip(few, ids))[:4]:
            print("  ", main_object(s).name, "|", dec(x)[:160].replace("\n", " "))
r = easy_vqa.evaluate(model, proc, smolvlm.vqa_prompt, image_mode="real", limit=96, batch_size=32, progress=False)
print("easy-vqa real", r["accuracy"])
