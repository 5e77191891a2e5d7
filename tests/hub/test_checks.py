"""hf_dream.hub.checks: what a drafter folder may hold before anything is uploaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hub_helpers import no_network, replace_weights, saved_drafter

from hf_dream.cli import main
from hf_dream.hub import HubFolderError, push_to_hub


@pytest.fixture
def drafter_dir(tmp_path) -> Path:
    return saved_drafter(tmp_path)


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda d: (d / "pytorch_model.bin").write_bytes(b"pickle"), "pytorch_model.bin: .bin files may hold pickled code"),
        (lambda d: (d / "optimizer.pt").write_bytes(b"pickle"), "optimizer.pt: .pt files"),
        (lambda d: replace_weights(d, lambda t: t.update({"embed_tokens.weight": torch.zeros(256, 64)})), "target weights"),
        (lambda d: replace_weights(d, lambda t: t.update({"lm_head.weight": torch.zeros(256, 64)})), "target weights"),
        (lambda d: replace_weights(d, lambda t: t.update({"extra.weight": torch.zeros(256, 64)})), "vocabulary-sized tensors"),
        (lambda d: replace_weights(d, lambda t: t.update({"norm.weight": torch.zeros(65)})), "shapes differ"),
        (lambda d: replace_weights(d, lambda t: t.pop("norm.weight")), "missing for this config"),
        (lambda d: (d / "model.safetensors").open("ab").write(b"\0" * 16), "not a valid safetensors file"),
        (lambda d: (d / "model.safetensors").write_bytes(b"not safetensors at all"), "not a valid safetensors file"),
        (lambda d: (d / "README.md").unlink(), "README.md (the model card) is missing"),
        (lambda d: (d / "notes.docx").write_bytes(b"x"), "unexpected file type"),
        (lambda d: (d / "helper.py").write_text("import os\n"), "not written by export_remote_code"),
        (lambda d: (d / "config.json").write_text(json.dumps({"model_type": "llava"})), "not a DreamConfig"),
    ],
    ids=["bin", "pt", "embed", "lm_head", "vocab-sized", "shape", "missing", "trailing-bytes", "garbage",
         "no-card", "unknown-file", "stray-code", "not-dream"],
)
def test_push_refuses_unsafe_or_inconsistent_folders(drafter_dir, monkeypatch, breakage, message, capsys):
    no_network(monkeypatch)
    breakage(drafter_dir)
    with pytest.raises(HubFolderError) as error:
        push_to_hub(drafter_dir, "someone/dream-tiny", dry_run=True)
    assert any(message in problem for problem in error.value.problems), error.value.problems
    assert main(["push", "--folder", str(drafter_dir), "--repo-id", "someone/dream-tiny", "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_shapes_are_read_from_headers_through_safe_open_without_loading_tensors(drafter_dir, monkeypatch):
    """check_folder reads names and shapes with `safetensors.safe_open` (which also validates the byte layout) and never
    materialises a tensor: a multi-GB drafter is checked in milliseconds."""
    import safetensors

    from hf_dream.hub import checks

    opened, loaded = [], []

    class Recording:
        def __init__(self, path, framework, **kwargs):
            opened.append(Path(path).name)
            self.inner = safetensors.safe_open(path, framework=framework, **kwargs)

        def __enter__(self):
            handle = self.inner.__enter__()

            class Handle:
                keys = handle.keys
                get_slice = handle.get_slice

                def get_tensor(self, name):
                    loaded.append(name)
                    return handle.get_tensor(name)

            return Handle()

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

    monkeypatch.setattr(checks, "safe_open", Recording)
    files = checks.check_folder(drafter_dir)
    assert opened == ["model.safetensors"] and loaded == []
    assert "model.safetensors" in {f["path"] for f in files}
    assert checks.tensor_shapes(drafter_dir / "model.safetensors")["norm.weight"] == (64,)


def test_the_cards_base_model_must_be_the_configs_target_unless_that_has_no_hub_id(drafter_dir, monkeypatch):
    """A card naming another model than the config's Hub target is refused; a drafter trained on a target loaded
    from a folder (no Hub id to compare) pushes with the base model its card names (`hf-dream card --base-model`)."""
    from hub_helpers import write_card

    no_network(monkeypatch)
    write_card(drafter_dir, base_model="someone/another-model")
    with pytest.raises(HubFolderError, match="the card's base_model 'someone/another-model' is not the config's target"):
        push_to_hub(drafter_dir, "someone/dream-tiny", dry_run=True)
    config = json.loads((drafter_dir / "config.json").read_text())
    (drafter_dir / "config.json").write_text(json.dumps(dict(config, target_name_or_path="/models/llava-1.5-7b")))
    write_card(drafter_dir, base_model="llava-hf/llava-1.5-7b-hf")
    assert push_to_hub(drafter_dir, "someone/dream-tiny", dry_run=True).dry_run
