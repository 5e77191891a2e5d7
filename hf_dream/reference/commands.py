"""`hf-dream reference ACTION NAME`: build, evaluate and try the reference targets.

* `build`: assemble the target from its registry package + committed vision weights and cache it
  (`--retrain`: train the vision part first, and rewrite the committed weights);
* `eval`: easy-VQA accuracy with the real image vs. a blank and a wrong (shuffled) image, plus a
  DREAM greedy-equality check and a few open-ended generations;
* `ask`: one image + one prompt -> the answer.

`--record`/`--output` write JSON with the command line, date and machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import shlex
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

from . import REFERENCE_TARGETS
from .common import MissingReferenceAsset, git_revision, machine_description, now_iso, torch_threads, write_json

# The installed hf_dream package: recorded results name committed files relative to it
# ("hf_dream/reference/weights/..."), and its git revision where it is imported from a checkout.
PACKAGE_DIR = Path(str(resources.files("hf_dream")))
ACTIONS = ("build", "eval", "ask", "make-data", "quality")
DTYPES = ("float32", "bfloat16")
OPEN_ENDED_PROMPTS = (
    "Describe the image.",
    "Write a short story about what you see.",
    "What could this picture be used for?",
)


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of `hf-dream reference`."""

    from .vision_training import VisionTrainingArguments

    defaults = {f.name: f.default for f in dataclasses.fields(VisionTrainingArguments)}
    parser.add_argument("action", choices=ACTIONS, help="build: assemble + cache the target; eval: easy-VQA accuracy; ask: one image + prompt")
    parser.add_argument("name", choices=REFERENCE_TARGETS, help="which reference target")
    parser.add_argument("--cache-dir", default=None, help="folder of the built target (none: $HF_DREAM_CACHE/reference/NAME, else ~/.cache/hf_dream/reference/NAME)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads: 1 leaves a core free on shared machines")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    build = parser.add_argument_group("build")
    build.add_argument("--retrain", action="store_true", help="build: train the vision encoder + connector on the committed instruction data + easy-VQA first (resumable) and rewrite the committed weights file")
    build.add_argument("--steps", type=int, default=defaults["max_steps"], help="build --retrain: optimizer steps")
    build.add_argument("--learning-rate", type=float, default=defaults["learning_rate"], help="build --retrain: peak learning rate of the mixture stage")
    build.add_argument("--batch-size", type=int, default=defaults["per_device_train_batch_size"], help="build --retrain: batch size")
    build.add_argument("--max-response-tokens", type=int, default=defaults["max_response_tokens"], help="build --retrain: train on the first N tokens of each response")
    build.add_argument("--shape-steps", type=int, default=defaults["shape_steps"], help="build --retrain: stage-0 steps in which the vision tower alone learns the objects' shapes (VisionTrainingArguments.shape_steps)")
    build.add_argument("--transcript-steps", type=int, default=defaults["transcript_steps"], help="build --retrain: stage-1 steps in which the image tokens learn to spell the scene's transcript (VisionTrainingArguments.transcript_steps)")
    build.add_argument("--train-arg", action="append", default=[], metavar="FIELD=VALUE", help="build --retrain: set any other VisionTrainingArguments field, e.g. --train-arg transcript_vision_lr_scale=0.1 (repeatable; checked before anything loads)")
    build.add_argument("--init-weights", default=None, help="build --retrain: start every stage from a vision-training checkpoint's model.safetensors, a build's --weights file or a vision tower alone (VisionTrainingArguments.init_weights; a fresh schedule)")
    build.add_argument("--weights", default=None, help="the trained vision weights file to read (build, eval, ask, quality: a candidate measured before it is committed) or write (build --retrain); none: the committed one")
    build.add_argument("--record", default=None, help="build: merge the wall times etc. into this JSON (e.g. benchmarks/reference/smolvlm-ref-build.json)")
    evaluation = parser.add_argument_group("eval")
    evaluation.add_argument("--split", default="test", choices=("test", "train"), help="eval: easy-VQA split")
    evaluation.add_argument("--limit", type=int, default=None, help="eval: a seeded random subset of this many questions (none: all)")
    evaluation.add_argument("--modes", default="real,blank,shuffled", help="eval: comma-separated image modes among real, blank, shuffled")
    evaluation.add_argument("--eval-batch-size", type=int, default=32, help="eval: questions per batched generate() call")
    evaluation.add_argument("--dtype", default="float32", choices=DTYPES, help="eval/ask: dtype the model runs in")
    evaluation.add_argument("--output", default=None, help="eval: write the results JSON here (e.g. benchmarks/reference/smolvlm-ref-accuracy.json)")
    evaluation.add_argument("--dream-check", type=int, default=4, help="eval: prompts on which greedy generate() with a fresh DREAM drafter must equal plain generate (0: skip)")
    quality = parser.add_argument_group("quality")
    quality.add_argument("--previous-accuracy", default=None, help="quality: an earlier build's `eval` JSON to compare easy-VQA accuracy with (same --limit: same questions)")
    data = parser.add_argument_group("make-data")
    data.add_argument("--num", type=int, default=3200, help="make-data: scene examples (training seeds and wordings) answered by the text model")
    data.add_argument("--data-batch-size", type=int, default=32, help="make-data: prompts per batched generate() call")
    data.add_argument("--data-max-new-tokens", type=int, default=192, help="make-data: longest response")
    data.add_argument("--data-output", default=None, help="make-data: the .jsonl.gz to write (none: the committed hf_dream/reference/data/NAME-instructions.jsonl.gz)")
    ask = parser.add_argument_group("ask")
    ask.add_argument("--image", default=None, help="ask: path of the image (omit for a text-only prompt)")
    ask.add_argument("--prompt", default="What shape is in the image?", help="ask: the user prompt")
    ask.add_argument("--max-new-tokens", type=int, default=64, help="ask, and eval's DREAM check + open-ended samples: tokens to generate")


def run(args: argparse.Namespace) -> int:
    """Dispatch `hf-dream reference ACTION NAME`; a missing registry package is a clean error, not a traceback."""
    try:
        with torch_threads(args.threads):
            return {"build": _build, "eval": _eval, "ask": _ask, "make-data": _make_data, "quality": _quality}[args.action](args)
    except MissingReferenceAsset as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _source_revision() -> str | None:
    """The git revision of the checkout hf_dream runs from, or None for an installed copy (even one
    installed inside some git tree, e.g. a git-ignored venv: its files are not tracked there)."""
    import subprocess

    try:
        tracked = subprocess.run(["git", "-C", str(PACKAGE_DIR), "ls-files", "--error-unmatch", "__init__.py"], capture_output=True)
    except OSError:  # no git
        return None
    return git_revision(PACKAGE_DIR) if tracked.returncode == 0 else None


def _command_line(args: argparse.Namespace) -> str:
    """The command as typed (`hf_dream.cli.main` keeps its argv on the namespace)."""
    argv = getattr(args, "argv", None) or sys.argv[1:]
    return "hf-dream " + shlex.join(argv)


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def _training_overrides(pairs: list[str]) -> dict[str, Any]:
    """`--train-arg FIELD=VALUE` pairs as VisionTrainingArguments keywords, each value parsed as its field's type."""
    from .vision_training import VisionTrainingArguments

    fields = {f.name: f for f in dataclasses.fields(VisionTrainingArguments)}
    overrides: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            raise SystemExit(f"error: --train-arg {pair!r}: not FIELD=VALUE with a VisionTrainingArguments field" + (f" (did you mean {close[0]!r}?)" if close else ""))
        default = fields[name].default
        kind = type(default) if default is not None and default is not dataclasses.MISSING else str
        try:
            overrides[name] = (text.lower() in ("1", "true", "yes")) if kind is bool else kind(text)
        except ValueError:
            raise SystemExit(f"error: --train-arg {pair!r}: {name} needs a value of type {kind.__name__}") from None
    return overrides


def _build(args: argparse.Namespace) -> int:
    from . import _module
    from .vision_training import VisionTrainingArguments

    target = _module(args.name)
    training_args = VisionTrainingArguments(**{
        **dict(output_dir=None, max_steps=args.steps, per_device_train_batch_size=args.batch_size, max_response_tokens=args.max_response_tokens,
               shape_steps=args.shape_steps, transcript_steps=args.transcript_steps, init_weights=args.init_weights, learning_rate=args.learning_rate),
        **_training_overrides(args.train_arg),
    }) if args.retrain else None
    weights = Path(args.weights) if args.weights else target.WEIGHTS_PATH
    started = time.perf_counter()
    record = target.build(
        retrain=args.retrain, training_args=training_args, cache_dir=args.cache_dir, weights_path=weights,
        threads=args.threads, progress=not args.no_progress,
    )
    record["wall_seconds"] = round(time.perf_counter() - started, 1)
    if args.record:
        path = Path(args.record)
        existing = json.loads(path.read_text()) if path.is_file() else {}
        weights_file = Path(record["weights"]).resolve()
        if weights_file.is_relative_to(PACKAGE_DIR.resolve()):  # the shipped file: recorded as hf_dream/...
            record["weights"] = f"hf_dream/{weights_file.relative_to(PACKAGE_DIR.resolve()).as_posix()}"
        entry = {
            "command": _command_line(args),
            "date": now_iso(),
            "git_revision": _source_revision(),
            "machine": machine_description(),
            **record,
        }
        # one file, two entries: the training run and the plain rebuild from committed weights
        existing["retrain" if args.retrain else "build_from_committed_weights"] = entry
        existing["description"] = (
            f"Wall times of building {args.name}: `retrain` trains the vision encoder + connector on "
            "easy-VQA and assembles the model; `build_from_committed_weights` assembles it from the "
            "registry GGUF + the committed vision weights (what users run). build_seconds excludes training."
        )
        write_json(path, dict(sorted(existing.items())))
        print(f"recorded in {path}")
    print(json.dumps({k: record[k] for k in ("cache_dir", "training_seconds", "build_seconds", "wall_seconds")}, indent=2))
    return 0


def _make_data(args: argparse.Namespace) -> int:
    from .instruction_data import make_data

    if args.num < 1:
        raise SystemExit(f"--num must be at least 1, not {args.num}")
    make_data(
        args.name, args.num, batch_size=args.data_batch_size, max_new_tokens=args.data_max_new_tokens, threads=args.threads,
        out_path=Path(args.data_output) if args.data_output else None, progress=not args.no_progress, command=_command_line(args),
    )
    return 0


def _quality(args: argparse.Namespace) -> int:
    from . import _module, load_reference_target
    from .quality import evaluate_quality, render_markdown

    model, processor = load_reference_target(args.name, cache_dir=args.cache_dir, dtype=_torch_dtype(args.dtype), weights_path=args.weights)
    report = {
        "command": _command_line(args), "date": now_iso(), "git_revision": _source_revision(), "machine": machine_description(),
        "target": args.name, "build_id": getattr(model.config, "hf_dream_reference_build", None),
        "build": _module(args.name).cached_build_info(args.cache_dir),
    }
    report.update(evaluate_quality(args.name, model, processor, vqa_limit=args.limit or 1000, batch_size=args.eval_batch_size // 4 or 1,
                                   progress=not args.no_progress))
    if args.previous_accuracy:  # an earlier build's `eval` JSON, for the easy-VQA comparison
        previous = json.loads(Path(args.previous_accuracy).read_text())
        report["previous_easy_vqa"] = {"source": args.previous_accuracy, **{m: r["accuracy"] for m, r in previous["results"].items()},
                                       "questions": previous["results"]["real"]["questions"], "build": (previous.get("build") or {}).get("weights_sha256")}
    if args.output:
        out = Path(args.output)
        write_json(out, report)
        out.with_suffix(".md").write_text(render_markdown(report))
        print(f"written to {out} and {out.with_suffix('.md')}")
    return 0


def _eval(args: argparse.Namespace) -> int:

    from . import _module, easy_vqa, load_reference_target

    target = _module(args.name)

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in easy_vqa.IMAGE_MODES]
    if bad:
        raise SystemExit(f"unknown image modes {bad}; choose among {easy_vqa.IMAGE_MODES}")
    dtype = _torch_dtype(args.dtype)
    model, processor = load_reference_target(args.name, cache_dir=args.cache_dir, dtype=dtype, weights_path=args.weights)
    results: dict[str, Any] = {}
    for mode in modes:
        started = time.perf_counter()
        result = easy_vqa.evaluate(
            model, processor, target.vqa_prompt, split=args.split, image_mode=mode, limit=args.limit,
            batch_size=args.eval_batch_size, progress=not args.no_progress,
        )
        result["seconds"] = round(time.perf_counter() - started, 1)
        results[mode] = result
        print(f"{args.name} easy-VQA {args.split} ({mode} image): accuracy {result['accuracy']:.4f} "
              + " ".join(f"{k}={v['accuracy']:.3f}" for k, v in result["by_question_kind"].items()))
    report: dict[str, Any] = {
        "command": _command_line(args),
        "date": now_iso(),
        "git_revision": _source_revision(),
        "machine": machine_description(),
        "target": args.name,
        "build": target.cached_build_info(args.cache_dir),
        "dataset": f"easy-vqa==1.0, {args.split} split" + (f", seeded random subset of {args.limit}" if args.limit else ""),
        "prompt": target.PROMPT_DESCRIPTION,
        "generation": {"do_sample": False, "max_new_tokens": 5, "dtype": args.dtype},
        "metric": "normalised exact match: first word of the generation, lower-cased, letters only ('grey'->'gray'), equals the label (13 answers)",
        "image_modes": {
            "real": "the question's own image",
            "blank": "a plain white 64x64 image",
            "shuffled": "another test image (seeded derangement of image ids)",
        },
        "majority_answer_baseline": easy_vqa.majority_baselines(args.split),
        "summary": _summary(results),
        "results": results,
    }
    if args.dream_check:
        report["dream_greedy_check"] = dream_greedy_check(model, processor, args.dream_check, args.max_new_tokens)
        print(f"DREAM greedy equality on {args.dream_check} prompts: {report['dream_greedy_check']['all_equal']}")
    report["open_ended_samples"] = open_ended_samples(model, processor, args.max_new_tokens)
    for sample in report["open_ended_samples"]:
        print(f"--- {sample['prompt']}\n{sample['answer']}")
    if args.output:
        write_json(args.output, report)
        print(f"written to {args.output}")
    ok = not args.dream_check or report["dream_greedy_check"]["all_equal"]
    return 0 if ok else 1


def _summary(results: dict[str, Any]) -> dict[str, Any]:
    """Accuracy per image mode: all questions, shape + colour questions together, yes/no questions.

    Read the yes/no column with care: easy-VQA's yes/no questions are mostly answerable from the
    question alone ("is there a red shape?" is "no" for 7 of 8 colours), so a blind model scores
    well on them; the shape/colour questions are the clean test of image dependence.
    """
    summary = {}
    for mode, result in results.items():
        kinds = result["by_question_kind"]
        open_kinds = [kinds[k] for k in ("shape", "color") if k in kinds]
        n_open = sum(k["questions"] for k in open_kinds)
        summary[mode] = {
            "all": result["accuracy"],
            "shape_or_color": round(sum(k["accuracy"] * k["questions"] for k in open_kinds) / n_open, 4) if n_open else None,
            "yes/no": kinds.get("yes/no", {}).get("accuracy"),
        }
    return summary


def _test_images(count: int):
    from PIL import Image

    from . import easy_vqa

    examples, paths = easy_vqa.load_split("test")
    ids = sorted(paths)[:count]
    return [Image.open(paths[i]).convert("RGB") for i in ids]


def dream_greedy_check(model, processor, count: int, max_new_tokens: int) -> dict[str, Any]:
    """Greedy generate() with a fresh (untrained) DREAM drafter must equal plain greedy generate()."""
    import torch

    import hf_dream

    from . import build_prompt_inputs

    drafter = hf_dream.DreamDraftModel.from_target(model)
    prompts = ["What color is the shape? Answer with one word.", *OPEN_ENDED_PROMPTS]
    checks = []
    for i, image in enumerate(_test_images(count)):
        inputs = build_prompt_inputs(processor, image, prompts[i % len(prompts)], dtype=model.dtype)
        with torch.inference_mode():
            plain = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            dream = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, assistant_model=drafter)
        checks.append({"prompt": prompts[i % len(prompts)], "equal": bool(torch.equal(plain, dream)), "new_tokens": plain.shape[1] - inputs["input_ids"].shape[1]})
    return {"drafter": "DreamDraftModel.from_target(model) (untrained)", "max_new_tokens": max_new_tokens, "checks": checks, "all_equal": all(c["equal"] for c in checks)}


def open_ended_samples(model, processor, max_new_tokens: int) -> list[dict[str, str]]:
    """Greedy answers to open-ended prompts on a test image: the frozen SmolLM2 should keep them fluent."""
    import torch

    from . import build_prompt_inputs

    image = _test_images(1)[0]
    samples = []
    for prompt in OPEN_ENDED_PROMPTS:
        inputs = build_prompt_inputs(processor, image, prompt, dtype=model.dtype)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        samples.append({"image": "easy-vqa test image 0", "prompt": prompt, "answer": text})
    return samples


def _ask(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    from . import build_prompt_inputs, load_reference_target

    model, processor = load_reference_target(args.name, cache_dir=args.cache_dir, dtype=_torch_dtype(args.dtype), weights_path=args.weights)
    image = Image.open(args.image) if args.image else None
    inputs = build_prompt_inputs(processor, image, args.prompt, dtype=model.dtype)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    return 0
