import random, sys, torch
sys.path.insert(0, "benchmarks/reference/smolvlm-ref-v2-attempt3/scripts")
from layouts import layout
from hf_dream.reference import smolvlm
from hf_dream.reference.quality import names_object, main_object
from hf_dream.reference.scenes import scene_from_seed, EVAL
from hf_dream.reference.instructions import instruction_for
torch.set_num_threads(1)
mode = sys.argv[1]
text_lm, tok = smolvlm.load_smollm2()
spec = smolvlm.SPECS["v2"]
proc = smolvlm.build_processor(tok, spec)
model = smolvlm.assemble(text_lm, tok, spec).eval()
E = model.get_input_embeddings().weight.detach()
n = 24
few = [scene_from_seed(EVAL.seed(100_000 + i), max_objects=2) for i in range(n)]
describe = [instruction_for(s, random.Random(i), split="heldout", kind="describe")[1] for i, s in enumerate(few)]
image_id = model.config.image_token_id
hits = 0
for s, p in zip(few, describe):
    inputs = smolvlm.build_prompt_inputs(proc, s.draw(), p)
    ids = inputs["input_ids"][0]
    emb = E[ids].clone()
    pos = (ids == image_id).nonzero().flatten()
    emb[pos] = E[torch.tensor(layout(tok, s, mode))]
    with torch.inference_mode():
        out = model.generate(inputs_embeds=emb[None], attention_mask=inputs["attention_mask"], max_new_tokens=64, do_sample=False)
    text = tok.decode(out[0], skip_special_tokens=True)
    h = names_object(text, main_object(s).color, main_object(s).shape)
    hits += h
    print(main_object(s).name, h, "|", text[:120].replace("\n", " "), flush=True)
print(mode, "oracle named", hits / n)
