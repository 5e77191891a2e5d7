"""Reduced draft vocabularies (EAGLE-3 style): the target tokens the drafter may propose."""

from __future__ import annotations

from collections import Counter

import torch


def most_frequent_tokens(dataset, size: int, always: list[int] | tuple[int, ...] = ()) -> torch.LongTensor:
    """The `size` most frequent *response* token ids of a prepared dataset, plus `always`
    (e.g. EOS, so that a draft can end), sorted by id. Ties are broken by the smaller id, so the
    result is deterministic. Rarely used tokens are simply never drafted: the target still
    produces them, so decoding stays lossless; only acceptance suffers when they occur."""
    counts: Counter[int] = Counter()
    for ids, start in zip(dataset["input_ids"], dataset["prompt_length"]):
        counts.update(ids[start:])
    always = list(dict.fromkeys(int(t) for t in always))
    if len(always) > size:
        raise ValueError(f"draft vocabulary of {size} cannot hold the {len(always)} required tokens")
    ranked = [t for t, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])) if t not in always]
    chosen = always + ranked[: size - len(always)]
    if len(chosen) < size:  # fewer distinct tokens than slots: fill with the lowest unused ids
        used = set(chosen)
        chosen += [t for t in range(size * 2 + max(used, default=0) + 1) if t not in used][: size - len(chosen)]
    return torch.tensor(sorted(chosen), dtype=torch.long)


def vocabulary_coverage(dataset, draft_vocab: torch.LongTensor) -> float:
    """Fraction of response tokens of `dataset` that the draft vocabulary contains."""
    allowed = set(draft_vocab.tolist())
    total = hit = 0
    for ids, start in zip(dataset["input_ids"], dataset["prompt_length"]):
        response = ids[start:]
        total += len(response)
        hit += sum(t in allowed for t in response)
    return hit / max(total, 1)
