"""Can the frozen text model read a *cell-indexed* transcript? The 64 image-token embeddings set to the layout's token
embeddings (no vision tower), held-out one/two-object scenes, held-out "describe" wordings, greedy 64 tokens; prints the
share naming the main object's colour and shape (as `quality.py` counts it). args: mode (cells | cellsp | countcells), scenes.
cells: one slot per place of the 3x3 grid in reading order, WIDTH tokens each (" large red circle, top left." or spaces
when the cell is empty); the k-th cell's slot is at a fixed offset whatever else is in the picture."""
import random, sys, torch
from hf_dream.reference import smolvlm
from hf_dream.reference.quality import names_object, main_object
from hf_dream.reference.scenes import scene_from_seed, EVAL, PLACES
from hf_dream.reference.instructions import instruction_for
torch.set_num_threads(1)
mode, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 24
text_lm, tok = smolvlm.load_smollm2()
spec = smolvlm.SPECS["v2"]
proc = smolvlm.build_processor(tok, spec)
model = smolvlm.assemble(text_lm, tok, spec).eval()
E = model.get_input_embeddings().weight.detach()
ids_of = lambda s: tok(s, add_special_tokens=False)["input_ids"]
SHORT = {(0, 0): "top left", (1, 0): "top", (2, 0): "top right", (0, 1): "left", (1, 1): "center", (2, 1): "right",
         (0, 2): "bottom left", (1, 2): "bottom", (2, 2): "bottom right"}
space = ids_of(" ")[0]
def cell_layout(scene, width=7):
    by_cell = {o.cell: o for o in scene.objects}
    out = []
    if mode == "countcells":  # the count phrase first (5 tokens), then 9 cells x 6
        n = len(scene.objects)
        out, width = ids_of("There is one object:" if n == 1 else f"There are {['zero', 'one', 'two', 'three', 'four'][n]} objects:"), 6
    for r in range(3):
        for c in range(3):
            o = by_cell.get((c, r))
            piece = ids_of(f" {o.size} {o.color} {o.shape}, {SHORT[(c, r)]}." if mode == "cellsp" else f" {o.size} {o.color} {o.shape} {SHORT[(c, r)]},") if o else []
            piece = piece[:width]
            out += piece + [space] * (width - len(piece))
    return (out + [space] * 64)[:64]
few = [scene_from_seed(EVAL.seed(100_000 + i), max_objects=2) for i in range(n)]
describe = [instruction_for(s, random.Random(i), split="heldout", kind="describe")[1] for i, s in enumerate(few)]
image_id = model.config.image_token_id
hits = 0
for s, p in zip(few, describe):
    inputs = smolvlm.build_prompt_inputs(proc, s.draw(), p)
    ids = inputs["input_ids"][0]
    emb = E[ids].clone()
    pos = (ids == image_id).nonzero().flatten()
    emb[pos] = E[torch.tensor(cell_layout(s))]
    with torch.inference_mode():
        out = model.generate(inputs_embeds=emb[None], attention_mask=inputs["attention_mask"], max_new_tokens=64, do_sample=False)
    text = tok.decode(out[0], skip_special_tokens=True)
    h = names_object(text, main_object(s).color, main_object(s).shape)
    hits += h
    print(main_object(s).name, h, "|", text[:120].replace("\n", " "), flush=True)
print(mode, "oracle named", hits / n)
