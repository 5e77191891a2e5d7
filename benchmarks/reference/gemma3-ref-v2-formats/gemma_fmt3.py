"""Uniform base-model formats across all kinds + easy-VQA-like questions; <start_of_image>/<end_of_image> suppressed. args: N threads formats"""
import sys, random, statistics, collections, torch, time
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor, SuppressTokensLogitsProcessor
from hf_dream.reference import gemma3
from hf_dream.reference.scenes import scene_from_seed, EVAL
from hf_dream.reference.instructions import instruction_for, KINDS
torch.set_num_threads(int(sys.argv[2]))
N = int(sys.argv[1])
FORMATS = {
    "plain": "{bos}Picture: {d}\n\nQuestion: {i}\n\nAnswer:",
    "para3": "{bos}Picture: {d}\n\nQuestion: {i}\n\nAnswer (three paragraphs, at least ten sentences):",
    "full": "{bos}Picture: {d}\n\nQuestion: {i}\n\nAnswer (as long and detailed as the question needs):",
    "fullp": "{bos}Picture: {d}\n\nQuestion: {i}\n\nAnswer (short questions get a short answer; open requests get several paragraphs):",
    "shot2": "{bos}Picture: The picture has a plain white background. There is one object: a large green triangle in the middle.\n\nQuestion: Describe this picture.\n\nAnswer: The picture shows a single large green triangle standing in the middle of a plain white background. Its three straight sides meet in sharp corners, and its point faces up, so it looks a little like a mountain or the roof of a house. The green is bright and fresh, like spring grass, and it stands out clearly against the white around it.\n\nNothing else is in the picture, which makes the triangle feel calm and simple. Because it is large and centred, it is the first and only thing the eye goes to. A picture like this could be a road sign, a logo for a hiking club, or the first page of a book about shapes for young children.\n\nPicture: The picture has a plain black background. There are two objects: a small yellow star in the top right corner and a medium blue circle at the bottom.\n\nQuestion: Write a short story about this picture.\n\nAnswer: Every night, the little yellow star looked down from the top right corner of the dark sky. Far below it sat a round blue circle, quiet and still, like a pond that had never seen the sun. The star wondered what it would be like to be so calm, and the circle wondered what it would be like to shine.\n\nOne night the star sent down a single beam of light. It landed on the circle, and for a moment the blue glowed bright as the morning. From then on the two were friends: the star shone a little for the circle, and the circle held the star's light until dawn.\n\nPicture: {d}\n\nQuestion: {i}\n\nAnswer:",
}
names = sys.argv[3].split(",")
lm, tok = gemma3.load_text_model(); lm = lm.to(torch.bfloat16).eval()
tok.padding_side = "left"
stops = [tok.eos_token_id, *gemma3.stop_token_ids(tok), tok("Picture", add_special_tokens=False).input_ids[0]]
print("stops", stops, tok("Picture", add_special_tokens=False).input_ids)
suppress = [tok.convert_tokens_to_ids(t) for t in ("<start_of_image>", "<end_of_image>")]
print("suppress", suppress)
open_kinds = {k.name for k in KINDS if k.open_ended}
ex = []
for i in range(N):
    s = scene_from_seed(EVAL.seed(500_000 + i)); kind, text = instruction_for(s, random.Random(i), split="train")
    ex.append((s, kind, text, None))
VQ = ["What shape is in the image?", "What color is the shape?", "Is there a {c} shape in the image?", "Is there a {s} in the image?"]
for i in range(12):
    s = scene_from_seed(EVAL.seed(600_000 + i), max_objects=1); o = s.objects[0]
    q = VQ[i % 4].format(c=o.color if i % 8 < 4 else "green", s=o.shape if i % 8 < 4 else "circle")
    ex.append((s, "vqa", q, (o.color, o.shape)))
def loops(ids):
    c = collections.Counter(tuple(ids[k:k+4]) for k in range(len(ids) - 3))
    return bool(c) and max(c.values()) >= 4
for name in names:
    fmt = FORMATS[name]; t0 = time.time()
    prompts = [fmt.format(bos=tok.bos_token, d=s.description(), i=t) for s, _, t, _ in ex]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    proc = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.15, prompt_ignore_length=enc["input_ids"].shape[1]), SuppressTokensLogitsProcessor(suppress)])
    with torch.inference_mode():
        out = lm.generate(**enc, max_new_tokens=256, do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id, logits_processor=proc)
    lens, lp, short = [], [], collections.defaultdict(list)
    for (s, kind, t, truth), ids in zip(ex, out[:, enc["input_ids"].shape[1]:].tolist()):
        cut = next((k for k, x in enumerate(ids) if x in stops), None); ids = ids[:cut] if cut is not None else ids
        r = tok.decode(ids, skip_special_tokens=True).strip()
        if kind in open_kinds: lens.append(len(ids)); lp.append(loops(ids))
        else: short[kind].append((len(ids), t, s.description()[:80] if kind == "vqa" else "", r[:160].replace("\n", "\\n")))
    print(f"== {name}: open-ended median {statistics.median(lens)} mean {statistics.mean(lens):.0f} n {len(lens)} loops {sum(lp)/len(lp):.0%}  ({time.time()-t0:.0f}s)", flush=True)
    for kind, rows in short.items():
        print(f"   {kind}: median {statistics.median([r[0] for r in rows])} tokens")
        for r in rows[:6]: print("     ", r[1:], flush=True)
