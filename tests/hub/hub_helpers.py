"""Shared helpers of the hf_dream.hub tests: a tiny drafter, its card, a saved folder, a Hub client that must not be used."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import cached_target
from safetensors.torch import load_file, save_file

from hf_dream import DreamDraftModel
from hf_dream.hub import render_card

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_CARDS = REPO_ROOT / "model_cards"
TARGET_ID = "llava-hf/tiny-test-target"  # any valid repo id: nothing is downloaded


def make_drafter(family: str = "llava", **overrides) -> DreamDraftModel:
    drafter = DreamDraftModel.from_target(cached_target(family), target_name_or_path=TARGET_ID, **overrides)
    if drafter.cross_block is not None:
        with torch.no_grad():  # non-zero gates: the cross-attention block must matter in the comparisons
            drafter.cross_block.attn_gate.fill_(0.7)
            drafter.cross_block.mlp_gate.fill_(0.5)
    return drafter.eval()


def write_card(folder: Path, **extra) -> str:
    card = render_card(folder, license="apache-2.0", **extra)
    (folder / "README.md").write_text(str(card))
    return str(card)


def saved_drafter(tmp_path: Path) -> Path:
    """A trained-looking tiny drafter saved as it would be pushed: weights, config, card."""
    folder = tmp_path / "dream-tiny"
    make_drafter().save_pretrained(folder)
    write_card(folder)
    return folder


class NoNetwork:
    """Stands in for `HfApi` where no Hub call may happen (dry runs)."""

    def __init__(self, *args, **kwargs):
        raise AssertionError("HfApi must not be used in a dry run")


def no_network(monkeypatch) -> None:
    """Make any use of the Hub client in `hf_dream.hub` fail the test."""
    monkeypatch.setattr("hf_dream.hub.push.HfApi", NoNetwork)


def replace_weights(folder: Path, mutate) -> None:
    tensors = load_file(folder / "model.safetensors")
    mutate(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
