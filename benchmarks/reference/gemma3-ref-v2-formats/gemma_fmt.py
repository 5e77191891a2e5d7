"""Which base-model prompt format makes Gemma 3 270M write paragraphs about a scene in words? args: N formats..."""
import sys, random, statistics, collections, torch, time
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor
from hf_dream.reference import gemma3
from hf_dream.reference.scenes import scene_from_seed, EVAL
from hf_dream.reference.instructions import instruction_for, KINDS
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
N = int(sys.argv[1])
FORMATS = {
    "plain": "{bos}{d}\n\nQuestion: {i}\nAnswer:",
    "detailed": "{bos}{d}\n\nQuestion: {i}\nDetailed answer, in several sentences:",
    "essay": "{bos}The following is a picture, described in words, and a request about it, with a long, careful, well-written response.\n\nPicture: {d}\n\nQuestion: {i}\nAnswer:",
    "essay2": "{bos}Picture: {d}\n\nQuestion: {i}\n\nAnswer (a full paragraph of at least five sentences):",
    "para3": "{bos}Picture: {d}\n\nQuestion: {i}\n\nAnswer (three paragraphs, at least ten sentences):",
    "para5": "{bos}Picture: {d}\n\nQuestion: {i}\n\nAnswer (a long, detailed answer of at least ten sentences):",
    "shot1": "{bos}Picture: a plain white background. There is one object: a large green triangle in the middle.\n\nQuestion: Describe this picture.\n\nAnswer (a full paragraph): The picture shows a single large green triangle standing in the middle of a plain white background. Its three straight sides meet in sharp corners, and its point faces up, so it looks a little like a mountain or the roof of a house. The green is bright and fresh, like spring grass, and it stands out clearly against the white around it. Nothing else is in the picture, which makes the triangle feel calm and simple. Because it is large and centred, it is the first and only thing the eye goes to.\n\nPicture: {d}\n\nQuestion: {i}\n\nAnswer (a full paragraph):",
}
names = sys.argv[3].split(",") if len(sys.argv) > 3 else list(FORMATS)
lm, tok = gemma3.load_text_model(); lm = lm.to(torch.bfloat16).eval()
tok.padding_side = "left"
stops = [tok.eos_token_id, *gemma3.stop_token_ids(tok)]
open_kinds = {k.name for k in KINDS if k.open_ended}
ex = []
for i in range(N):
    s = scene_from_seed(EVAL.seed(500_000 + i)); kind, text = instruction_for(s, random.Random(i), split="train")
    ex.append((s, kind, text))
def loops(ids):
    c = collections.Counter(tuple(ids[k:k+4]) for k in range(len(ids) - 3))
    return bool(c) and max(c.values()) >= 4
for name in names:
    fmt = FORMATS[name]; t0 = time.time()
    prompts = [fmt.format(bos=tok.bos_token, d=s.description(), i=t) for s, _, t in ex]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    proc = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.15, prompt_ignore_length=enc["input_ids"].shape[1])])
    with torch.inference_mode():
        out = lm.generate(**enc, max_new_tokens=256, do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id, logits_processor=proc)
    lens, lp, texts = [], [], []
    for (s, kind, t), ids in zip(ex, out[:, enc["input_ids"].shape[1]:].tolist()):
        cut = next((k for k, x in enumerate(ids) if x in stops), None); ids = ids[:cut] if cut is not None else ids
        if kind in open_kinds: lens.append(len(ids)); lp.append(loops(ids))
        texts.append((kind, t, tok.decode(ids, skip_special_tokens=True)))
    print(f"== {name}: open-ended median {statistics.median(lens)} mean {statistics.mean(lens):.0f} n {len(lens)} loops {sum(lp)/len(lp):.0%}  ({time.time()-t0:.0f}s)", flush=True)
    for kind, t, r in texts[:3]: print("  ", kind, "|", t, "|", r[:400].replace("\n", "\\n"))
