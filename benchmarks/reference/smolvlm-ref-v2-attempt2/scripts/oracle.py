"""Oracle: image tokens replaced by the word embeddings of what stands in each cell: does SmolLM2 then describe the scene?"""
import random, sys, torch
from hf_dream.reference import smolvlm
from hf_dream.reference.quality import names_object, main_object
from hf_dream.reference.scenes import scene_from_seed, EVAL
from hf_dream.reference.instructions import instruction_for
from hf_dream.reference.vision_training import GRID
torch.set_num_threads(1)
mode = sys.argv[1] if len(sys.argv) > 1 else "alt"
text_lm, tok = smolvlm.load_smollm2()
spec = smolvlm.SPECS["v2"]
proc = smolvlm.build_processor(tok, spec)
model = smolvlm.assemble(text_lm, tok, spec).eval()
E = model.get_input_embeddings().weight.detach()
def word(w):
    ids = tok(" " + w, add_special_tokens=False)["input_ids"]
    return E[ids].mean(0)
n = 24
few = [scene_from_seed(EVAL.seed(100_000 + i), max_objects=2) for i in range(n)]
describe = [instruction_for(s, random.Random(i), split="heldout", kind="describe")[1] for i, s in enumerate(few)]
image_id = model.config.image_token_id
side = 8
def embeds_for(scene, prompt):
    inputs = smolvlm.build_prompt_inputs(proc, scene.draw(), prompt)
    ids = inputs["input_ids"][0]
    emb = E[ids].clone()
    pos = (ids == image_id).nonzero().flatten()
    cells = {}
    for o in scene.objects:
        cells[o.cell[1] * GRID + o.cell[0]] = o
    bg = word(scene.background)
    toks = []
    for r in range(side):
        for c in range(side):
            cell = (r * GRID // side) * GRID + c * GRID // side
            o = cells.get(cell)
            if o is None:
                toks.append(bg if mode != "dot" else word("."))
            else:
                toks.append(word(o.color) if c % 2 == 0 else word(o.shape))
    if mode == "slots":
        import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).parent))
        from transcript import transcript_ids
        toks = [E[t] for t in transcript_ids(tok, scene)]
    if mode.startswith("desc"):
        d = tok(scene.description(), add_special_tokens=False)["input_ids"][:side * side]
        filler = {"descnl": "\n", "descsp": " ", "descdot": "."}[mode]
        f = tok(filler, add_special_tokens=False)["input_ids"][0]
        if mode == "descnl":  # filler first, description last: it then ends right before the prompt
            seq = [f] * (side * side - len(d)) + d
        else:
            seq = d + [f] * (side * side - len(d))
        toks = [E[t] for t in seq]
    emb[pos] = torch.stack(toks)
    return emb, inputs["attention_mask"][0]
hits = 0
for s, p in zip(few, describe):
    emb, mask = embeds_for(s, p)
    with torch.inference_mode():
        out = model.generate(inputs_embeds=emb[None], attention_mask=mask[None], max_new_tokens=64, do_sample=False)
    text = tok.decode(out[0], skip_special_tokens=True)
    h = names_object(text, main_object(s).color, main_object(s).shape)
    hits += h
    if hits <= 3 or not h:
        print(main_object(s).name, h, "|", text[:150].replace("\n", " "), flush=True)
print("oracle named", hits / n)
