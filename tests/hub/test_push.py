"""hf_dream.hub.push: dry runs, the (mocked) upload of exactly the checked files, and DreamDraftModel.push_to_hub."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hub_helpers import make_drafter, no_network, saved_drafter, write_card

from hf_dream.cli import main
from hf_dream.hub import push_to_hub


@pytest.fixture
def drafter_dir(tmp_path) -> Path:
    return saved_drafter(tmp_path)


def test_eagle_style_drafter_with_reduced_vocabulary_is_carded_and_pushable(tmp_path, monkeypatch):
    no_network(monkeypatch)
    folder = tmp_path / "eagle-tiny"
    drafter = make_drafter(fusion="concat", draft_vocab_size=64)
    drafter.set_draft_vocab(torch.arange(0, 128, 2))
    drafter.save_pretrained(folder)
    card = write_card(folder)
    assert "EAGLE-style baseline" in card and "reduced draft vocabulary of 64 of the target's 256 tokens" in card
    assert [f["path"] for f in push_to_hub(folder, "someone/eagle-tiny", dry_run=True).files] == [
        "README.md", "config.json", "model.safetensors",
    ]



def test_push_dry_run_lists_exactly_the_files(drafter_dir, monkeypatch, capsys):
    no_network(monkeypatch)
    (drafter_dir / "__pycache__").mkdir()
    (drafter_dir / "__pycache__" / "x.pyc").write_bytes(b"\0")  # never uploaded
    result = push_to_hub(drafter_dir, "someone/dream-tiny", dry_run=True)
    expected = sorted(["README.md", "config.json", "model.safetensors"])
    assert [f["path"] for f in result.files] == expected
    assert [f["size"] for f in result.files] == [(drafter_dir / p).stat().st_size for p in expected]
    assert result.dry_run and result.has_weights and result.commit_url is None
    assert main(["push", "--folder", str(drafter_dir), "--repo-id", "someone/dream-tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would upload 3 files" in out and all(name in out for name in expected)


def test_push_creates_repo_and_uploads_only_checked_files(drafter_dir, monkeypatch):
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs))
            return type("CommitInfo", (), {"commit_url": "https://huggingface.co/someone/dream-tiny/commit/abc"})()

    monkeypatch.setattr("hf_dream.hub.push.HfApi", FakeApi)
    result = push_to_hub(drafter_dir, "someone/dream-tiny", token="hf_test", private=True)
    assert calls[0] == ("init", "hf_test")
    assert calls[1] == ("create_repo", "someone/dream-tiny", {"repo_type": "model", "private": True, "exist_ok": True})
    upload = calls[2][1]
    assert upload["repo_id"] == "someone/dream-tiny" and upload["folder_path"] == str(drafter_dir)
    assert sorted(upload["allow_patterns"]) == ["README.md", "config.json", "model.safetensors"]
    assert result.commit_url.endswith("/commit/abc")


# --- DreamDraftModel.push_to_hub: the same checks as `hf-dream push` -------------------------
class RecordingApi:
    """A Hub client that records its calls (no network)."""

    calls: list = []

    def __init__(self, token=None):
        RecordingApi.calls = [("init", token)]

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        from pathlib import Path

        self.calls.append(("upload_folder", kwargs, sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())))
        return type("CommitInfo", (), {"commit_url": "https://huggingface.co/someone/dream-tiny/commit/def"})()


def test_model_push_to_hub_saves_cards_checks_and_uploads_the_checked_files(monkeypatch, tmp_path):
    monkeypatch.setattr("hf_dream.hub.push.HfApi", RecordingApi)
    drafter = make_drafter()
    result = drafter.push_to_hub("someone/dream-tiny", license="apache-2.0", token="hf_test", private=True, revision="v1")
    init, create, upload = RecordingApi.calls
    assert init == ("init", "hf_test")
    assert create == ("create_repo", "someone/dream-tiny", {"repo_type": "model", "private": True, "exist_ok": True})
    kwargs, present = upload[1], upload[2]
    assert sorted(kwargs["allow_patterns"]) == ["README.md", "config.json", "model.safetensors"] == present
    assert kwargs["revision"] == "v1" and kwargs["commit_message"] == "Upload DREAM drafter"
    assert result.has_weights and result.commit_url.endswith("/commit/def")

    # dry run into a kept folder: the card is hf-dream's, valid, with the licence given
    from hf_dream.hub import validate_card

    no_network(monkeypatch)
    result = drafter.push_to_hub("someone/dream-tiny", license="apache-2.0", dry_run=True, save_directory=tmp_path / "kept")
    assert [f["path"] for f in result.files] == ["README.md", "config.json", "model.safetensors"]
    assert validate_card((tmp_path / "kept" / "README.md").read_text())["license"] == "apache-2.0"


def test_model_push_to_hub_refuses_what_hf_dream_push_refuses(monkeypatch):
    """The inherited PreTrainedModel.push_to_hub uploaded whatever save_pretrained wrote; now the folder checks run."""
    from hf_dream.hub import HubFolderError

    no_network(monkeypatch)
    drafter = make_drafter()
    # a persistent buffer shaped like the target's embeddings: exactly what must never be redistributed
    drafter.register_buffer("embed_tokens_copy", torch.zeros(drafter.config.vocab_size, drafter.config.hidden_size))
    with pytest.raises(HubFolderError, match="target weights in the drafter files"):
        drafter.push_to_hub("someone/dream-tiny", license="apache-2.0", dry_run=True)


def test_model_push_to_hub_needs_a_license_and_save_pretrained_cannot_push(monkeypatch, tmp_path):
    no_network(monkeypatch)
    drafter = make_drafter()
    with pytest.raises(ValueError, match=r"push_to_hub needs license=\.\.\."):
        drafter.push_to_hub("someone/dream-tiny")
    with pytest.raises(ValueError, match="Give the repo id as owner/name"):
        drafter.push_to_hub("dream-tiny", license="apache-2.0")
    with pytest.raises(ValueError, match="without hf-dream's checks"):
        drafter.save_pretrained(tmp_path / "x", push_to_hub=True, repo_id="someone/dream-tiny")
    with pytest.raises(ValueError, match="without hf-dream's checks"):
        drafter.save_pretrained(tmp_path / "x", True, None, True)  # positionally, in transformers' order
    assert not (tmp_path / "x").exists()
