"""Does a reference target answer like a chat VLM? Length, grounding, easy-VQA, agreement with its text model, loops.

`hf-dream reference quality NAME --output benchmarks/reference/NAME-quality.json` measures, on held-out data only
(evaluation scene seeds, held-out instruction wordings, the photos bundled with scikit-image / scikit-learn,
easy-VQA test):

* **answer length** on open-ended instructions (`max_new_tokens=256`): the distribution of new tokens;
* **grounding**: on one- and two-object scenes, the share of "describe" answers that name the main (largest)
  object's colour and shape, with the real picture and with another scene's picture;
* **easy-VQA** accuracy with the real image, a blank one and a shuffled one;
* **agreement with the text model**: the VLM shown the picture against the text model reading the scene's
  description, greedy, over the first 32 tokens (the share of equal positions, and the common prefix);
* **degenerate loops**: the share of open-ended answers in which some 4-gram occurs 4 or more times, with the
  target's shipped generation config and without it (`repetition_penalty=1.0`).

Every generation is greedy; the answers are kept in the JSON so the numbers can be read against them.
"""

from __future__ import annotations

import random
import re
import statistics
from collections.abc import Callable
from typing import Any

import torch

from .instructions import KINDS, instruction_for, kinds_for
from .scenes import EVAL, Scene, scene_from_seed

OPEN_ENDED_KINDS = tuple(k.name for k in KINDS if k.open_ended)
SHAPE_WORDS = {  # what counts as naming a shape (plurals and near names a reader would accept)
    "circle": ("circle", "circles", "round"), "square": ("square", "squares"), "triangle": ("triangle", "triangles", "triangular"),
    "star": ("star", "stars"), "rectangle": ("rectangle", "rectangles", "rectangular"), "diamond": ("diamond", "diamonds", "rhombus"),
    "heart": ("heart", "hearts"), "hexagon": ("hexagon", "hexagons", "hexagonal"), "cross": ("cross", "crosses", "plus"),
    "ellipse": ("ellipse", "ellipses", "oval", "ovals", "elliptical"),
}
COLOR_WORDS = {"gray": ("gray", "grey")}
_WORD = re.compile(r"[a-z]+")


def words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def names_object(text: str, color: str, shape: str) -> bool:
    """Whether `text` names both the colour and the shape (any accepted word for each)."""
    present = words(text)
    return any(w in present for w in COLOR_WORDS.get(color, (color,))) and any(w in present for w in SHAPE_WORDS[shape])


def main_object(scene: Scene):
    """The largest object (the first listed among equals): what a description must mention."""
    order = {"large": 0, "medium": 1, "small": 2}
    return min(scene.objects, key=lambda o: order[o.size])


def has_loop(ids: list[int], n: int = 4, repeats: int = 4) -> bool:
    """Some `n`-gram occurs `repeats` or more times."""
    counts: dict[tuple[int, ...], int] = {}
    for k in range(len(ids) - n + 1):
        gram = tuple(ids[k : k + n])
        counts[gram] = counts.get(gram, 0) + 1
        if counts[gram] >= repeats:
            return True
    return False


def generate(model, processor, prompts: list[str], images: list | None, max_new_tokens: int, batch_size: int = 8,
             text_only_prompts: list[str] | None = None, progress: bool = True, desc: str = "", **generation) -> list[list[int]]:
    """Greedy new-token ids for each prompt (with its image), batched with left padding; `text_only_prompts`: already
    formatted text prompts without images (the text model's view)."""
    from tqdm.auto import tqdm

    tokenizer = processor.tokenizer
    stop = model.generation_config.eos_token_id
    stop = set(stop if isinstance(stop, list) else [stop])
    results: list[list[int]] = []
    n = len(text_only_prompts if text_only_prompts is not None else prompts)
    for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress):
        if text_only_prompts is not None:
            texts = text_only_prompts[start : start + batch_size]
            inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        else:
            texts = [
                processor.apply_chat_template(
                    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}], add_generation_prompt=True, tokenize=False
                )
                for p in prompts[start : start + batch_size]
            ]
            inputs = processor(text=texts, images=[[im.convert("RGB")] for im in images[start : start + batch_size]], padding=True, return_tensors="pt")
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **generation)
        for row in out[:, inputs["input_ids"].shape[1] :].tolist():
            cut = next((k for k, t in enumerate(row) if t in stop), None)
            results.append(row[:cut] if cut is not None else row)
    return results


def _length_summary(lengths: list[int], limit: int = 256) -> dict[str, Any]:
    ordered = sorted(lengths)
    quantile = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {
        "n": len(ordered), "median": statistics.median(ordered), "mean": round(statistics.fmean(ordered), 1),
        "p10": quantile(0.1), "p25": quantile(0.25), "p75": quantile(0.75), "p90": quantile(0.9), "min": ordered[0], "max": ordered[-1],
        "at_limit_share": round(sum(n >= limit for n in ordered) / len(ordered), 4),
    }


def evaluate_quality(
    name: str, model, processor, num_open: int = 48, num_grounding: int = 40, num_agreement: int = 40, vqa_limit: int | None = 1000,
    batch_size: int = 8, progress: bool = True, log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """All quality measurements of reference target `name` (see the module docstring); returns the JSON-ready report."""
    from . import _module, easy_vqa
    from .prompts import _bundled_photos

    target = _module(name)
    tokenizer = processor.tokenizer
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    report: dict[str, Any] = {"generation_config": {k: getattr(model.generation_config, k) for k in ("repetition_penalty", "no_repeat_ngram_size", "suppress_tokens", "eos_token_id")}}

    # --- open-ended answers on held-out scenes and photos: length and loops, with and without the shipped config
    rng = random.Random(11)
    scenes = [scene_from_seed(EVAL.seed(i)) for i in range(num_open)]
    prompts = []
    for i, scene in enumerate(scenes):  # the open-ended kinds in turn (those that apply: "compare" needs two objects)
        applicable = [k for k in OPEN_ENDED_KINDS if k in {x.name for x in kinds_for(scene)}]
        prompts.append(instruction_for(scene, rng, split="heldout", kind=applicable[i % len(applicable)])[1])
    images = [s.draw() for s in scenes]
    photos = list(_bundled_photos())
    photo_prompts = [instruction_for(scenes[0], random.Random(i), split="heldout", kind=("describe", "story", "mood", "title")[i % 4])[1] for i in range(len(photos))]
    all_prompts, all_images = prompts + photo_prompts, images + [p for _, p in photos]
    sources = ["scene"] * len(prompts) + [n for n, _ in photos]
    open_ended: dict[str, Any] = {}
    for label, overrides in (("shipped_config", {}), ("no_repetition_penalty", {"repetition_penalty": 1.0})):
        ids = generate(model, processor, all_prompts, all_images, 256, batch_size, progress=progress, desc=f"{name} open-ended ({label})", **overrides)
        lengths = [len(x) for x in ids]
        summary = _length_summary(lengths)
        open_ended[label] = {
            "length": summary,
            "length_scenes": _length_summary(lengths[: len(prompts)]),
            "length_photos": _length_summary(lengths[len(prompts) :]),
            "loop_share": round(sum(has_loop(x) for x in ids) / len(ids), 4),
            "answers": [{"source": s, "prompt": p, "new_tokens": len(x), "loop": has_loop(x), "answer": decode(x)} for s, p, x in zip(sources, all_prompts, ids)],
        }
        log(f"[{name}] open-ended ({label}): median {summary['median']} new tokens, loops {open_ended[label]['loop_share']:.0%}")
    report["open_ended"] = open_ended

    # --- grounding: "describe" answers naming the main object's colour and shape, real vs another scene's picture
    few = [scene_from_seed(EVAL.seed(100_000 + i), max_objects=2) for i in range(num_grounding)]
    describe = [instruction_for(s, random.Random(i), split="heldout", kind="describe")[1] for i, s in enumerate(few)]
    grounding: dict[str, Any] = {}
    for label, shown in (("real_image", few), ("other_scene_image", few[1:] + few[:1])):
        ids = generate(model, processor, describe, [s.draw() for s in shown], 96, batch_size, progress=progress, desc=f"{name} grounding ({label})")
        hits = [names_object(decode(x), main_object(s).color, main_object(s).shape) for s, x in zip(few, ids)]
        grounding[label] = {
            "share_naming_main_object": round(sum(hits) / len(hits), 4),
            "answers": [{"scene": s.description(), "main_object": main_object(s).name, "named": h, "answer": decode(x)} for s, h, x in zip(few, hits, ids)],
        }
        log(f"[{name}] grounding ({label}): {grounding[label]['share_naming_main_object']:.0%} name the main object")
    report["grounding"] = grounding

    # --- agreement with the text model reading the description (the VLM without an image is its text model)
    agree_scenes = [scene_from_seed(EVAL.seed(200_000 + i)) for i in range(num_agreement)]
    agree_prompts = [instruction_for(s, random.Random(i), split="heldout")[1] for i, s in enumerate(agree_scenes)]
    vlm_ids = generate(model, processor, agree_prompts, [s.draw() for s in agree_scenes], 32, batch_size, progress=progress, desc=f"{name} agreement (image)")
    text_prompts = [target.text_prompt(tokenizer, s.description(), p) for s, p in zip(agree_scenes, agree_prompts)]
    text_ids = generate(model, processor, [], None, 32, batch_size, text_only_prompts=text_prompts, progress=progress, desc=f"{name} agreement (words)")
    equal, prefix = [], []
    for a, b in zip(vlm_ids, text_ids):
        a, b = a[:32], b[:32]
        span = max(len(a), len(b))
        equal.append(sum(x == y for x, y in zip(a, b)) / max(1, span))
        common = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix.append(common)
    report["text_model_agreement"] = {
        "position_match_rate_first_32": round(statistics.fmean(equal), 4),
        "median_common_prefix_tokens": statistics.median(prefix),
        "mean_common_prefix_tokens": round(statistics.fmean(prefix), 2),
        "samples": [{"prompt": p, "image_answer": decode(a), "words_answer": decode(b)} for p, a, b in list(zip(agree_prompts, vlm_ids, text_ids))[:8]],
    }
    log(f"[{name}] agreement with the text model: {report['text_model_agreement']['position_match_rate_first_32']:.0%} of the first 32 positions")

    # --- easy-VQA test
    vqa = {}
    for mode in easy_vqa.IMAGE_MODES:
        result = easy_vqa.evaluate(model, processor, target.vqa_prompt, image_mode=mode, limit=vqa_limit, batch_size=32, progress=progress)
        vqa[mode] = {"accuracy": result["accuracy"], "by_question_kind": result["by_question_kind"], "questions": result["questions"]}
        log(f"[{name}] easy-VQA ({mode} image): {result['accuracy']:.3f}")
    report["easy_vqa"] = vqa
    return report


def render_markdown(report: dict[str, Any]) -> str:
    """The report's headline numbers as a Markdown page."""
    oe, gr, ag, vqa = report["open_ended"], report["grounding"], report["text_model_agreement"], report["easy_vqa"]
    lines = [
        f"# {report['target']}: answer quality (build {report.get('build_id')})",
        "",
        f"Command: `{report.get('command')}`  ",
        f"Date: {report.get('date')}; generation config shipped with the target: `{report['generation_config']}`",
        "",
        "| measure | shipped config | without repetition penalty |",
        "|---|---:|---:|",
    ]
    a, b = oe["shipped_config"], oe["no_repetition_penalty"]
    lines += [
        f"| open-ended answers: median new tokens (all / scenes / photos) | {a['length']['median']} / {a['length_scenes']['median']} / {a['length_photos']['median']} | {b['length']['median']} / {b['length_scenes']['median']} / {b['length_photos']['median']} |",
        f"| open-ended answers: p10 / p90 new tokens | {a['length']['p10']} / {a['length']['p90']} | {b['length']['p10']} / {b['length']['p90']} |",
        f"| answers cut at 256 tokens | {a['length']['at_limit_share']:.0%} | {b['length']['at_limit_share']:.0%} |",
        f"| degenerate loops (a 4-gram 4+ times) | {a['loop_share']:.0%} | {b['loop_share']:.0%} |",
        "",
        "| grounding (one- and two-object held-out scenes, 'describe') | share naming the main object's colour and shape |",
        "|---|---:|",
        f"| real picture | {gr['real_image']['share_naming_main_object']:.0%} |",
        f"| another scene's picture | {gr['other_scene_image']['share_naming_main_object']:.0%} |",
        "",
        f"Agreement with the text model reading the description (first 32 greedy tokens): {ag['position_match_rate_first_32']:.0%} of positions equal, "
        f"median common prefix {ag['median_common_prefix_tokens']} tokens.",
        "",
        "| easy-VQA test | real image | blank image | shuffled image |",
        "|---|---:|---:|---:|",
        f"| accuracy ({vqa['real']['questions']} questions) | {vqa['real']['accuracy']:.3f} | {vqa['blank']['accuracy']:.3f} | {vqa['shuffled']['accuracy']:.3f} |",
    ]
    if report.get("previous_easy_vqa"):
        lines.append(f"| previous build ({report['previous_easy_vqa']['source']}) | {report['previous_easy_vqa']['real']:.3f} | {report['previous_easy_vqa']['blank']:.3f} | {report['previous_easy_vqa']['shuffled']:.3f} |")
    return "\n".join(lines) + "\n"


__all__ = ["evaluate_quality", "has_loop", "main_object", "names_object", "render_markdown"]
