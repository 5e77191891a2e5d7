import random, torch
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor
from hf_dream.reference import smolvlm
from hf_dream.reference.quality import names_object, main_object
from hf_dream.reference.scenes import scene_from_seed, EVAL
from hf_dream.reference.instructions import instruction_for
torch.set_num_threads(1)
lm, tok = smolvlm.load_smollm2(); lm.eval()
n = 24
few = [scene_from_seed(EVAL.seed(100_000 + i), max_objects=2) for i in range(n)]
describe = [instruction_for(s, random.Random(i), split="heldout", kind="describe")[1] for i, s in enumerate(few)]
hits = 0
for s, p in zip(few, describe):
    text = smolvlm.text_prompt(tok, s.description(), p)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    procs = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.15, prompt_ignore_length=enc["input_ids"].shape[1])])
    with torch.inference_mode():
        out = lm.generate(**enc, max_new_tokens=64, do_sample=False, logits_processor=procs)
    ans = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    h = names_object(ans, main_object(s).color, main_object(s).shape); hits += h
    if not h: print(main_object(s).name, "|", ans[:140].replace("\n", " "))
print("text ceiling named", hits / n)
