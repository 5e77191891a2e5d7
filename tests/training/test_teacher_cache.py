"""TeacherCache: stored teacher signals are the live teacher's, batch for batch (every family, with and
without visual compression, EAGLE-3 feature layers); the trainer's losses are the same with and without it;
filling is resumable, shared over processes, content-addressed, and keyed by the settings the signals need."""

from __future__ import annotations

import pytest
import torch
from conftest import cached_target

from hf_dream import DreamDraftModel
from hf_dream.features import read_teacher
from hf_dream.targets import get_target_adapter
from hf_dream.testing import SUPPORTED_TINY_FAMILIES, make_tiny_inputs
from hf_dream.training import DreamTrainer, DreamTrainingArguments, prepare_dataset
from hf_dream.training.data import DreamDataCollator, target_identity
from hf_dream.training.teacher_cache import TeacherCache, TeacherCacheSettings, with_row_keys


def prepare(tmp_path, family, num=6):
    target = cached_target(family)
    return prepare_dataset(
        target,
        [{"seed": i} for i in range(num)],
        lambda example: make_tiny_inputs(target, seed=example["seed"]),
        tmp_path / f"data-{family}",
        max_new_tokens=12,
        batch_size=3,
        shard_size=3,
        show_progress=False,
    )


def settings_for(target, candidate_layers=None, static_layer=None, feature_layers=None):
    return TeacherCacheSettings(
        target=target_identity(target),
        candidate_layers=candidate_layers,
        static_layer=static_layer,
        feature_layers=feature_layers,
        autocast_dtype=None,
        storage_dtype="float32",
    )


class CountingForward:
    """Counts the target's forward passes (a hook on the model)."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls += 1

    def remove(self):
        self.handle.remove()


@pytest.mark.parametrize("family", SUPPORTED_TINY_FAMILIES)
def test_stored_signals_are_the_live_teachers(tmp_path, family):
    target = cached_target(family)
    adapter = get_target_adapter(target)
    candidates = DreamDraftModel.from_target(target).config.entropy_candidate_layers
    dataset = with_row_keys(prepare(tmp_path, family), progress=False)
    cache = TeacherCache(tmp_path / "cache", settings_for(target, candidate_layers=tuple(candidates)), rows_per_shard=4)
    assert cache.fill(adapter, dataset, batch_size=2, progress=False) == len(dataset)
    # a batch composed differently from the ones the cache was filled with (other rows, other padding)
    batch = DreamDataCollator(target.generation_config.pad_token_id or 0)([dataset[i] for i in (5, 0, 3)])
    valid = batch["attention_mask"].bool()
    for keep_ratio in (1.0, 0.5):
        live = read_teacher(adapter, batch, candidate_layers=candidates, keep_ratio=keep_ratio)
        stored = cache.signals(batch, adapter, keep_ratio)
        for name in ("input_embeds", "features", "logits", "mid_features"):
            torch.testing.assert_close(getattr(stored, name)[valid], getattr(live, name)[valid], rtol=1e-4, atol=1e-5, msg=name)
        assert torch.equal(stored.mid_layers[valid], live.mid_layers[valid])
        assert torch.equal(stored.top1[valid], live.top1[valid]) and torch.equal(live.top1, live.logits.argmax(-1))
        rows = torch.tensor([3, 0, 7])  # a draft vocabulary: only its rows of the logits, in its order
        on_rows = cache.signals(batch, adapter, keep_ratio, logit_rows=rows)
        torch.testing.assert_close(on_rows.logits[valid], live.logits[valid][:, rows], rtol=1e-4, atol=1e-5)
        assert torch.equal(on_rows.logit_rows, rows)
        assert torch.equal(stored.keep & valid, live.keep & valid)
        if keep_ratio < 1.0 and adapter.image_token_mask(batch["input_ids"]).any():
            assert not bool((stored.keep | ~valid).all())  # some visual tokens dropped: the ranking was really compared


def test_stored_eagle3_feature_inputs_and_static_supervision(tmp_path):
    target = cached_target("llava")
    adapter = get_target_adapter(target)
    layers = DreamDraftModel.from_target(target, fusion="concat", feature_layers="eagle3").config.feature_layers
    dataset = with_row_keys(prepare(tmp_path, "llava", num=3), progress=False)
    cache = TeacherCache(tmp_path / "cache", settings_for(target, static_layer=1, feature_layers=tuple(layers)))
    cache.fill(adapter, dataset, progress=False)
    batch = DreamDataCollator(0)([dataset[i] for i in range(3)])
    valid = batch["attention_mask"].bool()
    live = read_teacher(adapter, batch, static_layer=1, feature_layers=layers)
    stored = cache.signals(batch, adapter, 1.0)
    torch.testing.assert_close(stored.feature_inputs[valid], live.feature_inputs[valid], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stored.mid_features[valid], live.mid_features[valid], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "fusion,keep_ratio,bf16,draft_vocab",
    [("cross_attention", 0.75, False, None), ("concat", 1.0, False, 64), ("cross_attention", 0.75, True, 64)],
)
def test_training_losses_are_the_same_with_the_cache(tmp_path, fusion, keep_ratio, bf16, draft_vocab):
    # float32: the same numbers; bf16 autocast (signals stored in bf16, logits recomputed under autocast): close
    target = cached_target("llava")
    dataset = prepare(tmp_path, "llava", num=4)

    def first_batch_loss(cache_dir):
        torch.manual_seed(0)
        drafter = DreamDraftModel.from_target(target, fusion=fusion, visual_keep_ratio=keep_ratio, draft_vocab_size=draft_vocab)
        if draft_vocab:  # the cache then gives logits on these rows only
            drafter.set_draft_vocab(
                torch.randperm(target.config.get_text_config().vocab_size, generator=torch.Generator().manual_seed(1))[
                    :draft_vocab
                ]
            )
        args = DreamTrainingArguments(
            output_dir=str(tmp_path / "out"),
            per_device_train_batch_size=4,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            teacher_cache_dir=cache_dir,
            ttt_steps=2,
            bf16=bf16,
        )
        trainer = DreamTrainer(model=drafter, teacher=target, args=args, train_dataset=dataset)
        batch = next(iter(trainer.get_train_dataloader()))
        assert ("row_key" in batch) == (cache_dir is not None)
        if cache_dir is not None:  # read outside any autocast too: float32 features, logits as bf16 autocast makes them
            stored = trainer.teacher_cache.signals(batch, trainer.adapter, keep_ratio)
            assert stored.features.dtype == torch.float32
            assert stored.logits.dtype == (torch.bfloat16 if bf16 else torch.float32)
        return float(trainer.compute_loss(drafter, batch).detach()), dict(trainer._metrics)

    live_loss, live_metrics = first_batch_loss(None)
    cached_loss, cached_metrics = first_batch_loss(str(tmp_path / "cache"))
    tolerance = dict(rel=3e-2, abs=1e-3) if bf16 else dict(rel=1e-4, abs=1e-6)
    assert cached_loss == pytest.approx(live_loss, **tolerance)
    assert cached_metrics.keys() == live_metrics.keys()
    for name, values in live_metrics.items():
        assert cached_metrics[name] == pytest.approx(values, **tolerance), name


def test_training_from_the_cache_runs_the_target_only_to_fill_it(tmp_path):
    target = cached_target("llava")
    dataset = prepare(tmp_path, "llava", num=6)
    counter = CountingForward(target)
    try:
        args = DreamTrainingArguments(
            output_dir=str(tmp_path / "out"),
            max_steps=3,
            per_device_train_batch_size=2,
            per_device_eval_batch_size=3,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            save_strategy="no",
            teacher_cache_dir=str(tmp_path / "cache"),
            eval_strategy="steps",
            eval_steps=3,
            acceptance_eval_samples=0,
        )
        trainer = DreamTrainer(
            model=DreamDraftModel.from_target(target),
            teacher=target,
            args=args,
            train_dataset=dataset.select(range(4)),
            eval_dataset=dataset.select(range(4, 6)),
        )
        filled = counter.calls
        assert filled == 2 + 1  # 4 training rows in batches of 3, then 2 eval rows
        trainer.train()
        assert trainer.state.global_step == 3 and counter.calls == filled
        assert any("eval_loss" in entry for entry in trainer.state.log_history)
        # a second training on the same rows (reshuffled, split differently) computes nothing
        DreamTrainer(
            model=DreamDraftModel.from_target(target),
            teacher=target,
            args=args,
            train_dataset=dataset.shuffle(seed=1).select(range(5)),
            eval_dataset=dataset.select([5]),
        )
        assert counter.calls == filled
    finally:
        counter.remove()


def test_filling_resumes_shares_out_and_keys_by_settings(tmp_path):
    target = cached_target("llava")
    adapter = get_target_adapter(target)
    dataset = with_row_keys(prepare(tmp_path, "llava", num=6), progress=False)
    settings = settings_for(target, candidate_layers=(1,))
    # a run stopped after a few shards (and one half-written file), then resumed
    first = TeacherCache(tmp_path / "cache", settings, rows_per_shard=2)
    assert first.fill(adapter, dataset.select(range(2)), progress=False) == 2
    (first.directory / ".tmp-deadbeef-1.safetensors").write_bytes(b"partial")
    resumed = TeacherCache(tmp_path / "cache", settings, rows_per_shard=2)
    assert len(resumed) == 2 and len(resumed.missing(dataset)) == 4
    # two processes (each lists what is missing before either writes): each computes its own shards, together all
    ranks = [TeacherCache(tmp_path / "cache", settings, rows_per_shard=2) for _ in range(2)]
    counts = [
        cache.fill(adapter, dataset, process_index=rank, num_processes=2, progress=False) for rank, cache in enumerate(ranks)
    ]
    assert counts == [2, 2]
    resumed.refresh()
    assert resumed.missing(dataset) == []
    # other supervision layers: other signals, another directory, nothing reused
    other = TeacherCache(tmp_path / "cache", settings_for(target, candidate_layers=(2,)))
    assert other.directory != resumed.directory and len(other.missing(dataset)) == len(dataset)
    with pytest.raises(KeyError, match="No stored teacher signals for row"):
        other.signals(DreamDataCollator(0)([dataset[0]]), adapter, 1.0)
