"""How long does the frozen text model answer the training mix under other system prompts? (teacher length study)"""
import dataclasses, json, statistics, sys, time
from pathlib import Path
import torch
from hf_dream.reference import smolvlm
from hf_dream.reference.instruction_data import example_plan, generate_responses
from hf_dream.reference.instructions import KINDS
from hf_dream.reference.quality import has_loop
from hf_dream.reference.scenes import scene_from_seed

torch.set_num_threads(2)
OPEN = {k.name for k in KINDS if k.open_ended}
N = int(sys.argv[1]) if len(sys.argv) > 1 else 48
plan = [e for e in example_plan(400) if e.kind in OPEN][:N]
lm, tok = smolvlm.load_text_model()
base = smolvlm.text_responder(tok)
SYSTEMS = {
    "default": None,
    "detailed": "You are a helpful AI assistant named SmolLM, trained by Hugging Face. You always answer in detail, with several full paragraphs.",
    "thorough": "You are a helpful AI assistant named SmolLM, trained by Hugging Face. Give thorough, well-developed answers: describe every object, its colour, shape, size and place, and explain your reasoning at length.",
}
out = {}
for name, system in SYSTEMS.items():
    def prompt(tokenizer, description, instruction, system=system):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": f"{description}\n\n{instruction}"}]
        return tokenizer.apply_chat_template(messages, chat_template=smolvlm.CHAT_TEMPLATE, add_generation_prompt=True, tokenize=False)
    responder = dataclasses.replace(base, prompt=prompt)
    partial = Path(f"/work/exp/s11/teacher-{name}.jsonl"); partial.unlink(missing_ok=True)
    t = time.time()
    made = generate_responses(lm, tok, responder, plan, partial, batch_size=24, max_new_tokens=256, progress=False, log=lambda m: None)
    lengths = [e.response_tokens for e in made]
    loops = [has_loop(tok(e.response, add_special_tokens=False)["input_ids"]) for e in made]
    names = []
    for e in made:
        obj = scene_from_seed(e.seed).objects[0]
        names.append(obj.color in e.response.lower() and obj.shape in e.response.lower())
    out[name] = {"median": statistics.median(lengths), "ge100": sum(l >= 100 for l in lengths) / len(lengths), "at256": sum(l >= 256 for l in lengths) / len(lengths),
                 "loops": sum(loops) / len(loops), "names_first_object": sum(names) / len(names), "seconds": round(time.time() - t)}
    print(name, out[name], flush=True)
    print("  e.g.", made[0].instruction, "->", made[0].response[:400].replace("\n", " "), flush=True)
json.dump(out, open("/work/exp/s11/teacher_len.json", "w"), indent=1)
