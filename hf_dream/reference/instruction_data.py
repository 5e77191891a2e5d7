"""Image-grounded instruction data for the reference targets, made the LLaVA way.

For each example a scene is drawn from a training seed (`scenes.TRAIN`) and an instruction from the
training wordings (`instructions`); the target's own *frozen text model* reads the scene's description
in words plus the instruction and writes the response (greedy, with the target's shipped generation
config). No response comes from a template. The vision part is then trained so that the VLM, given the
*picture* and the instruction, reproduces it (`vision_training.py`).

The data is small text, committed as `data/<target>-instructions.jsonl.gz` (one JSON object per line:
scene seed, kind, instruction, response) with a sidecar `.json` recording how it was made. Making it is
resumable: finished batches are appended to `<cache>/reference/<target>-instructions.partial.jsonl`
and a rerun continues after the last complete line; a larger `--num` extends the committed file (the plan
is prefix-stable: example i is always the same scene and instruction).

```bash
hf-dream reference make-data smolvlm-ref --num 3200      # ~15 min on 2 CPU cores (bf16, batches of 32)
```
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .common import cache_root, now_iso, torch_threads
from .instructions import instruction_for
from .scenes import TRAIN, SeedSplit, scene_from_seed

DATA_DIR = Path(__file__).resolve().parent / "data"


@dataclasses.dataclass(frozen=True)
class InstructionExample:
    """One example: the scene seed, the instruction (kind + text) and, once made, the text model's response."""

    seed: int
    kind: str
    instruction: str
    response: str | None = None
    response_tokens: int | None = None
    finished: bool | None = None  # the response ended with the stop token (not cut at max_new_tokens)

    def to_json(self) -> str:
        """One line of the data file."""
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False)


def example_plan(num: int, split: SeedSplit = TRAIN, instruction_split: str = "train", offset: int = 0) -> list[InstructionExample]:
    """The first `num` examples of a split (from index `offset`): example i always gets scene `split.seed(offset + i)`
    and an instruction drawn from its own seeded generator, so a longer plan extends a shorter one."""
    plan = []
    for index in range(offset, offset + num):
        seed = split.seed(index)
        kind, text = instruction_for(scene_from_seed(seed), random.Random(seed * 7919 + 17), split=instruction_split)
        plan.append(InstructionExample(seed, kind, text))
    return plan


@dataclasses.dataclass(frozen=True)
class TextResponder:
    """How a reference target's text model answers a scene given in words: its prompt format, stop tokens and
    generation settings (the ones the target ships in its `generation_config.json`)."""

    name: str
    prompt: Callable[[Any, str, str], str]  # (tokenizer, description, instruction) -> the text model's prompt
    stop_token_ids: tuple[int, ...]
    generation: dict[str, Any]
    # A repetition penalty on the *response's own* tokens only. The generation config's `repetition_penalty`
    # also penalises every prompt token, here the description's words: measured on 32 training scenes, the text
    # model then names the main object's colour and shape in 28% of "describe" answers, against 88% with the
    # penalty on new tokens only (benchmarks/reference/smolvlm-ref-v2-attempt1.md).
    response_repetition_penalty: float | None = None


def data_path(name: str) -> Path:
    """The committed instruction data of reference target `name`."""
    return DATA_DIR / f"{name}-instructions.jsonl.gz"


def read_examples(path: str | os.PathLike) -> list[InstructionExample]:
    """The examples of a `.jsonl.gz` (or plain `.jsonl`) instruction-data file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no instruction data at {path}: make it with `hf-dream reference make-data <target>`")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [InstructionExample(**json.loads(line)) for line in f if line.strip()]


def _complete_lines(path: Path) -> list[str]:
    """Lines of a partial file that parse (a line cut by a kill is dropped and rewritten)."""
    if not path.is_file():
        return []
    good = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            json.loads(line)
        except json.JSONDecodeError:
            break
        good.append(line)
    return good


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def generate_responses(
    text_lm,
    tokenizer,
    responder: TextResponder,
    plan: list[InstructionExample],
    partial_path: Path,
    batch_size: int = 32,
    max_new_tokens: int = 256,
    dtype: torch.dtype = torch.bfloat16,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[InstructionExample]:
    """Answer every planned example with the text model (greedy, batched, left padding), resuming `partial_path`.

    Returns the examples with responses, in plan order. Regenerated data need not be bit-exact, so the text
    model runs in `dtype` (bf16: ~1.6x faster than fp32 on this CPU's AMX); evaluation runs in float32.
    """
    from tqdm.auto import tqdm
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    done_lines = _complete_lines(partial_path)
    done_lines = done_lines[: len(plan)]  # a longer earlier run: its first examples are this plan's
    done = [InstructionExample(**json.loads(line)) for line in done_lines]
    if [(e.seed, e.instruction) for e in done] != [(e.seed, e.instruction) for e in plan[: len(done)]]:
        raise ValueError(f"{partial_path} holds examples of another plan: delete it to start over")
    partial_path.parent.mkdir(parents=True, exist_ok=True)
    partial_path.write_text("".join(line + "\n" for line in done_lines), encoding="utf-8")
    todo = plan[len(done) :]
    if done:
        log(f"[{responder.name}] resuming: {len(done)} of {len(plan)} examples already made")
    text_lm = text_lm.to(dtype).eval()
    tokenizer.padding_side = "left"
    bar = tqdm(total=len(plan), initial=len(done), desc=f"{responder.name} text-model responses", disable=not progress, unit="ex")
    started, new_tokens = time.perf_counter(), 0
    with open(partial_path, "a", encoding="utf-8") as out:
        for batch in _batches(todo, batch_size):
            prompts = [responder.prompt(tokenizer, scene_from_seed(e.seed).description(), e.instruction) for e in batch]
            encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            processors = LogitsProcessorList()
            if responder.response_repetition_penalty is not None:  # left padding: every prompt ends at the same column
                processors.append(RepetitionPenaltyLogitsProcessor(
                    responder.response_repetition_penalty, prompt_ignore_length=encoded["input_ids"].shape[1]))
            with torch.inference_mode():
                output = text_lm.generate(
                    **encoded, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(responder.stop_token_ids),
                    pad_token_id=tokenizer.pad_token_id, logits_processor=processors, **responder.generation,
                )
            for example, ids in zip(batch, output[:, encoded["input_ids"].shape[1] :].tolist()):
                cut = next((k for k, t in enumerate(ids) if t in responder.stop_token_ids), None)
                ids = ids[:cut] if cut is not None else ids
                text = tokenizer.decode(ids, skip_special_tokens=True).strip()
                made = dataclasses.replace(example, response=text, response_tokens=len(ids), finished=cut is not None)
                out.write(made.to_json() + "\n")
                done.append(made)
                new_tokens += len(ids)
            out.flush()
            bar.update(len(batch))
            bar.set_postfix_str(f"{new_tokens / (time.perf_counter() - started):.0f} tok/s")
    bar.close()
    return done


def pack(examples: list[InstructionExample], path: Path, record: dict[str, Any]) -> Path:
    """Write the examples as `.jsonl.gz` (deterministic bytes: no timestamp in the gzip header) and the sidecar record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        for example in examples:
            f.write((example.to_json() + "\n").encode("utf-8"))
    os.replace(tmp, path)
    lengths = sorted(e.response_tokens or 0 for e in examples)
    record = {
        **record,
        "date": now_iso(),
        "examples": len(examples),
        "response_tokens": sum(lengths),
        "median_response_tokens": lengths[len(lengths) // 2] if lengths else 0,
        "finished_share": round(sum(bool(e.finished) for e in examples) / max(1, len(examples)), 4),
        "kinds": {k: sum(e.kind == k for e in examples) for k in sorted({e.kind for e in examples})},
    }
    path.with_name(path.name.removesuffix(".jsonl.gz") + ".json").write_text(json.dumps(record, indent=2) + "\n")
    return path


def make_data(
    name: str,
    num: int,
    batch_size: int = 32,
    max_new_tokens: int = 256,
    threads: int | None = 2,
    out_path: Path | None = None,
    progress: bool = True,
    command: str | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Make (or resume) the instruction data of reference target `name` and pack it to `out_path` (default: committed path)."""
    from . import _module

    target = _module(name)
    out_path = Path(out_path) if out_path else data_path(name)
    partial = cache_root() / "reference" / f"{name}-instructions.partial.jsonl"
    plan = example_plan(num)
    if not partial.is_file() and out_path.is_file():  # extending committed data: start from its examples
        packed = read_examples(out_path)
        if [(e.seed, e.instruction) for e in packed] == [(e.seed, e.instruction) for e in plan[: len(packed)]]:
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text("".join(e.to_json() + "\n" for e in packed[:num]), encoding="utf-8")
    with torch_threads(threads):
        text_lm, tokenizer = target.load_text_model()
        responder = target.text_responder(tokenizer)
        examples = generate_responses(text_lm, tokenizer, responder, plan, partial, batch_size, max_new_tokens, progress=progress, log=log)
    record = {
        "command": command,
        "target": name,
        "text_model": target.TEXT_MODEL_DESCRIPTION,
        "scene_seeds": f"{TRAIN.name} split, seeds {TRAIN.seed(0)}..{TRAIN.seed(num - 1)}",
        "instruction_wordings": "training wordings only (hf_dream.reference.instructions)",
        "generation": {"do_sample": False, "max_new_tokens": max_new_tokens, "dtype": "bfloat16", "batch_size": batch_size, **responder.generation,
                       "response_repetition_penalty": responder.response_repetition_penalty},
        "prompt_format": responder.prompt(tokenizer, "{description}", "{instruction}"),
    }
    pack(examples, out_path, record)
    log(f"[{name}] {len(examples)} examples written to {out_path}")
    partial.unlink(missing_ok=True)
    return out_path


__all__ = ["InstructionExample", "TextResponder", "data_path", "example_plan", "generate_responses", "make_data", "pack", "read_examples"]
