"""Upload of a checked drafter folder, or of a drafter in memory, to the Hugging Face Hub."""

from __future__ import annotations

import glob
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .cards import NO_WEIGHTS_STATUS, render_card
from .checks import check_folder


@dataclass
class PushResult:
    """What [`push_to_hub`] uploaded, or would upload (`dry_run`)."""

    repo_id: str
    folder: str
    files: list[dict]
    dry_run: bool
    has_weights: bool
    commit_url: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        """Total size of `files` in bytes."""
        return sum(f["size"] for f in self.files)

    def describe(self) -> str:
        """A human-readable summary for the command line: one line per file, then notes and the commit URL."""
        verb = "would upload" if self.dry_run else "uploaded"
        lines = [f"{verb} {len(self.files)} files ({self.total_bytes:,} bytes) from {self.folder} to {self.repo_id}:"]
        lines += [f"  {f['size']:>14,}  {f['path']}" for f in self.files]
        lines += [f"note: {note}" for note in self.notes]
        if self.commit_url:
            lines.append(f"commit: {self.commit_url}")
        return "\n".join(lines)


def _validated_repo_id(repo_id: str) -> str:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"Invalid repo id {repo_id!r}: {error}") from None
    if repo_id.count("/") != 1:
        raise ValueError(f"Give the repo id as owner/name, got {repo_id!r}.")
    return repo_id


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    dry_run: bool = False,
    token: str | bool | None = None,
    private: bool | None = False,
    commit_message: str | None = None,
    commit_description: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
) -> PushResult:
    """Check `folder` ([`check_folder`]) and upload exactly the checked files to `repo_id`.

    `dry_run=True` returns the list of files and sizes without any network access. Otherwise the
    repository is created if needed (`private` applies then) and the files go up in one commit
    with `HfApi.upload_folder`, restricted to the checked paths (on branch `revision`, or as a
    pull request with `create_pr=True`). `hf-dream push` and `DreamDraftModel.push_to_hub` both
    upload through this function, so every upload passes the same checks.
    """
    _validated_repo_id(repo_id)
    files = check_folder(folder)
    has_weights = any(f["path"].endswith(".safetensors") for f in files)
    notes = [] if has_weights else [f"no weights: the card states '{NO_WEIGHTS_STATUS}'"]
    result = PushResult(repo_id, str(folder), files, dry_run, has_weights, notes=notes)
    if dry_run:
        return result
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    optional = {"commit_description": commit_description, "revision": revision, "create_pr": create_pr or None}
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        # exact paths (glob-escaped), so that nothing unchecked is uploaded
        allow_patterns=[glob.escape(f["path"]) for f in files],
        commit_message=commit_message or ("Upload DREAM drafter" if has_weights else "Upload DREAM drafter config and card"),
        **{key: value for key, value in optional.items() if value is not None},
    )
    result.commit_url = getattr(commit, "commit_url", None) or str(commit)
    return result


def push_drafter(
    drafter,
    repo_id: str,
    *,
    license: str | None = None,
    base_model: str | None = None,
    benchmark_jsons: Iterable[str | Path | dict] = (),
    tags: list[str] | None = None,
    save_directory: str | Path | None = None,
    max_shard_size: int | str = "50GB",
    dry_run: bool = False,
    **upload,
) -> PushResult:
    """Save `drafter` (a `DreamDraftModel`), write its card, then upload it with [`push_to_hub`]'s checks.

    The folder is `save_directory` (kept), or a temporary one (removed after the upload; the
    result's `folder` then no longer exists). The card is [`render_card`]'s, with `license`
    (required: the target's licence applies to its drafter), `base_model` (default: the config's
    target), `tags` and the `hf-dream bench` results `benchmark_jsons`. `upload` takes
    [`push_to_hub`]'s `token`, `private`, `commit_message`, `commit_description`, `revision`,
    `create_pr`.
    """
    _validated_repo_id(repo_id)
    if not license:
        raise ValueError(
            "push_to_hub needs license=...: the card must name the drafter's licence, which is its target's "
            "(e.g. license='apache-2.0'; see the target's model card)."
        )
    if not drafter.config.target_name_or_path:
        raise ValueError(
            "The drafter's config does not name its target: set `drafter.config.target_name_or_path` to the "
            "target's Hub id (DreamDraftModel.from_target(target) records it) before pushing."
        )
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(save_directory) if save_directory is not None else Path(scratch) / repo_id.split("/")[-1]
        drafter.save_pretrained(folder, max_shard_size=max_shard_size)
        card = render_card(folder, benchmark_jsons, repo_id=repo_id, license=license, base_model=base_model, tags=tags or [])
        (folder / "README.md").write_text(str(card))
        return push_to_hub(folder, repo_id, dry_run=dry_run, **upload)
