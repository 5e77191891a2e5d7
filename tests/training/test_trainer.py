"""DreamTrainer end to end on a tiny target: regenerate data, distil, and the drafter drafts better;
resumable data preparation; two-process (gloo) training ends with identical weights on both ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cached_target
from safetensors.torch import load_file
from transformers.trainer_pt_utils import LengthGroupedSampler

from hf_dream import DreamDraftModel
from hf_dream.testing import make_tiny_inputs
from hf_dream.training import DreamTrainer, DreamTrainingArguments, measure_acceptance_length, prepare_dataset

FAMILY = "llava"


def free_port() -> str:
    """A currently free local TCP port for a launcher's rendezvous (fixed ports collide)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def prepare(tmp_path, num=16, encode=None, **kwargs):
    target = cached_target(FAMILY)
    encode = encode or (lambda example: make_tiny_inputs(target, seed=example["seed"]))
    return prepare_dataset(
        target, [{"seed": i} for i in range(num)], encode, tmp_path, max_new_tokens=40, batch_size=4, shard_size=4, show_progress=False, **kwargs
    )


def test_prepared_rows_hold_the_targets_own_greedy_responses(tmp_path):
    target = cached_target(FAMILY)
    dataset = prepare(tmp_path, num=6)
    assert len(dataset) == 6 and dataset["source_index"] == list(range(6))
    for index in (0, 5):
        inputs = make_tiny_inputs(target, seed=index)
        expected = target.generate(**inputs, max_new_tokens=40, do_sample=False)[0].tolist()
        row = dataset[index]
        assert row["input_ids"] == expected[: len(row["input_ids"])]
        assert row["prompt_length"] == inputs["input_ids"].shape[1]
        assert torch.equal(torch.tensor(row["pixel_values"]), inputs["pixel_values"][0:1].reshape(torch.tensor(row["pixel_values"]).shape))


def test_interrupted_preparation_resumes_to_the_same_dataset(tmp_path):
    target = cached_target(FAMILY)
    complete = prepare(tmp_path / "complete", num=10)
    calls = []

    def crashing_encode(example):
        calls.append(example["seed"])
        if len(calls) == 7:  # dies in the middle of the second shard
            raise KeyboardInterrupt
        return make_tiny_inputs(target, seed=example["seed"])

    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path / "resumed", num=10, encode=crashing_encode)
    finished = sorted(p.name for p in (tmp_path / "resumed" / "shards").iterdir() if not p.name.startswith("."))
    assert finished == ["00000"]  # the first shard survived, the interrupted one did not land
    calls.clear()
    resumed = prepare(tmp_path / "resumed", num=10, encode=crashing_encode)
    assert calls[0] == 4  # restarted at the first missing shard, no work redone
    assert resumed.to_list() == complete.to_list()
    with pytest.raises(ValueError, match="max_new_tokens: 40 before, 12 now"):  # resuming with other settings would mix datasets
        prepare_dataset(target, [{"seed": i} for i in range(10)], crashing_encode, tmp_path / "resumed", max_new_tokens=12)


@pytest.mark.parametrize("draft_vocab_size", [None, 96])
def test_training_raises_the_acceptance_length(tmp_path, draft_vocab_size):
    target = cached_target(FAMILY)
    dataset = prepare(tmp_path, num=16)
    torch.manual_seed(0)
    drafter = DreamDraftModel.from_target(target, draft_vocab_size=draft_vocab_size)
    if draft_vocab_size:
        from hf_dream.training.vocab import most_frequent_tokens, vocabulary_coverage

        drafter.set_draft_vocab(most_frequent_tokens(dataset, draft_vocab_size, always=[2]))
        assert vocabulary_coverage(dataset, drafter.draft_vocab) > 0.9
    before = measure_acceptance_length(target, drafter, dataset, 8, 32)
    args = DreamTrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=300, per_device_train_batch_size=4, learning_rate=3e-3, warmup_steps=10,
        logging_steps=100, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, acceptance_eval_samples=4,
    )
    trainer = DreamTrainer(model=drafter, teacher=target, args=args, train_dataset=dataset, eval_dataset=dataset.select(range(4)))
    trainer.train()
    metrics = trainer.evaluate()
    after = measure_acceptance_length(target, drafter, dataset, 8, 32)
    assert after >= before + 1.0, (before, after)
    assert metrics["eval_top1_agreement"] > 0.8 and metrics["eval_acceptance_length"] > before
    # the target's parameters were not touched
    assert all(not p.requires_grad for p in target.parameters())
    assert not any(p.grad is not None for p in target.parameters())


@pytest.mark.parametrize("mid_supervision", ["static", "none"])
def test_ablation_switches(tmp_path, mid_supervision):
    target = cached_target(FAMILY)
    dataset = prepare(tmp_path, num=4)
    drafter = DreamDraftModel.from_target(target, fusion="concat" if mid_supervision == "none" else "cross_attention")
    args = DreamTrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=2, report_to=[], save_strategy="no",
        use_cpu=True, disable_tqdm=True, mid_supervision=mid_supervision, static_layer_depth=0.5, logging_steps=1,
    )
    trainer = DreamTrainer(model=drafter, teacher=target, args=args, train_dataset=dataset)
    trainer.train()
    logged = {key for entry in trainer.state.log_history for key in entry}
    assert ("loss_mid" in logged) == (mid_supervision == "static")
    if mid_supervision == "static":
        assert drafter.config.static_feature_layer == 1  # round(0.5 * 2 layers)


@pytest.mark.parametrize(
    "fusion,mid_supervision", [("cross_attention", "entropy"), ("cross_attention", "static"), ("concat", "none"), ("cross_attention_concat", "entropy")]
)
def test_every_trainable_parameter_gets_a_gradient(tmp_path, fusion, mid_supervision):
    # what makes `ddp_find_unused_parameters=False` (our default) safe under DDP
    target = cached_target(FAMILY)
    drafter = DreamDraftModel.from_target(target, fusion=fusion)
    args = DreamTrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, report_to=[], use_cpu=True, mid_supervision=mid_supervision
    )
    assert args.ddp_find_unused_parameters is False
    trainer = DreamTrainer(model=drafter, teacher=target, args=args, train_dataset=prepare(tmp_path, num=2))
    trainer.compute_loss(drafter, next(iter(trainer.get_train_dataloader()))).backward()
    trainable = {name: p for name, p in drafter.named_parameters() if p.requires_grad}
    assert trainable and not [name for name, p in trainable.items() if p.grad is None]


@pytest.mark.parametrize("fusion", ["cross_attention", "concat"])
def test_training_time_test_loss_weighs_every_depth_and_reaches_every_parameter(tmp_path, fusion):
    target = cached_target(FAMILY)
    drafter = DreamDraftModel.from_target(target, fusion=fusion)
    if drafter.cross_block is not None:  # open the gates: a fresh block is the identity, and every depth would be depth 1
        with torch.no_grad():
            drafter.cross_block.attn_gate.fill_(0.7)
    args = DreamTrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, report_to=[], use_cpu=True, ttt_steps=3, ttt_decay=0.5
    )
    trainer = DreamTrainer(model=drafter, teacher=target, args=args, train_dataset=prepare(tmp_path, num=2))
    loss = trainer.compute_loss(drafter, next(iter(trainer.get_train_dataloader())))
    value = float(loss.detach())
    metrics = {key: values[-1] for key, values in trainer._metrics.items()}
    first = args.w_kl * metrics["loss_kl"] + args.w_final * metrics["loss_final"] + args.w_mid * metrics.get("loss_mid", 0.0)
    expected = (first + 0.5 * metrics["loss_depth2"] + 0.25 * metrics["loss_depth3"]) / 1.75
    assert value == pytest.approx(expected, rel=1e-5)
    assert {"top1_agreement", "top1_agreement_depth2", "top1_agreement_depth3"} <= set(metrics)
    assert metrics["loss_depth3"] != pytest.approx(first)  # depth 3 reads the drafter's own features
    loss.backward()
    assert not [name for name, p in drafter.named_parameters() if p.requires_grad and p.grad is None]
    one_step = DreamTrainer(model=drafter, teacher=target, args=DreamTrainingArguments(
        output_dir=str(tmp_path / "one"), per_device_train_batch_size=2, report_to=[], use_cpu=True), train_dataset=trainer.train_dataset)
    batch = next(iter(one_step.get_train_dataloader()))
    assert float(one_step.compute_loss(drafter, batch).detach()) == pytest.approx(first, rel=1e-5)  # ttt_steps=1: today's loss, depth 1


def test_an_eagle3_style_drafter_trains_its_feature_fusion_with_training_time_test(tmp_path):
    target = cached_target(FAMILY)
    drafter = DreamDraftModel.from_target(target, fusion="concat", feature_layers="eagle3")
    args = DreamTrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, report_to=[], use_cpu=True, ttt_steps=2)
    trainer = DreamTrainer(model=drafter, teacher=target, args=args, train_dataset=prepare(tmp_path, num=2))
    trainer.compute_loss(drafter, next(iter(trainer.get_train_dataloader()))).backward()
    assert drafter.feature_fusion.weight.grad is not None and drafter.feature_fusion.weight.grad.abs().sum() > 0
    assert not [name for name, p in drafter.named_parameters() if p.requires_grad and p.grad is None]


def test_length_grouped_batches_read_the_row_lengths_and_train(tmp_path):
    # `train_sampling_strategy="group_by_length"`: DreamTrainer adds the `length` column from input_ids alone, so the
    # Trainer's length-grouped sampler neither reads every row in full nor lets the column reach the target
    target = cached_target(FAMILY)
    dataset = prepare(tmp_path, num=8)
    cut = [dataset[i]["prompt_length"] + 2 + 5 * i for i in range(len(dataset))]  # eight different lengths
    dataset = dataset.map(lambda row, i: {"input_ids": row["input_ids"][: cut[i]]}, with_indices=True)
    args = DreamTrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, report_to=[], save_strategy="no",
        use_cpu=True, disable_tqdm=True, train_sampling_strategy="group_by_length",
    )
    trainer = DreamTrainer(model=DreamDraftModel.from_target(target), teacher=target, args=args, train_dataset=dataset)
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler) and list(sampler.lengths) == cut
    assert sorted(sampler) == list(range(len(dataset)))
    assert "length" not in next(iter(trainer.get_train_dataloader()))
    trainer.train()
    assert trainer.state.global_step == 2
    with pytest.raises(ValueError, match="length_column_name"):
        DreamTrainingArguments(output_dir="x", use_cpu=True, train_sampling_strategy="group_by_length", length_column_name="n")


def test_bad_arguments():
    with pytest.raises(ValueError, match="mid_supervision"):
        DreamTrainingArguments(output_dir="x", mid_supervision="median", use_cpu=True)
    with pytest.raises(ValueError, match="ttt_steps must be at least 1"):
        DreamTrainingArguments(output_dir="x", ttt_steps=0, use_cpu=True)
    with pytest.raises(ValueError, match=r"ttt_decay must be in \(0, 1\]"):
        DreamTrainingArguments(output_dir="x", ttt_decay=1.5, use_cpu=True)
    with pytest.raises(TypeError, match="DreamDraftModel"):
        DreamTrainer(model=cached_target(FAMILY), teacher=cached_target(FAMILY), args=DreamTrainingArguments(output_dir="x", use_cpu=True))


@pytest.mark.slow
def test_two_process_training_gives_identical_weights(tmp_path):
    prepare(tmp_path / "data", num=8)
    script = Path(__file__).with_name("ddp_train.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[2]))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(), str(script), str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    initial = load_file(tmp_path / "initial.safetensors")
    assert rank0.keys() == rank1.keys() == initial.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert any(not torch.equal(rank0[k], initial[k]) for k in rank0)  # it did train
    assert "world_size=2" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_the_train_command_runs_under_distributed_launchers(tmp_path, launcher):
    prepare(tmp_path / "data", num=8)
    config = tmp_path / "train.yaml"
    config.write_text(
        f"target: tiny:{FAMILY}\ndataset: {tmp_path / 'data'}\noutput_dir: {tmp_path / 'run'}\n"
        "max_steps: 3\nper_device_train_batch_size: 2\nuse_cpu: true\nreport_to: none\nsave_strategy: 'no'\n"
        "ddp_backend: gloo\ndisable_tqdm: true\nlogging_steps: 1\n"
    )
    if launcher == "torchrun":
        prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port()]
    else:
        # CPU-only: `--multi_gpu` selects accelerate's torchrun-based launcher; the config says use_cpu + gloo
        prefix = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", free_port()]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[2]))
    result = subprocess.run([*prefix, "-m", "hf_dream", "train", "--config", str(config)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    drafter = DreamDraftModel.from_pretrained(tmp_path / "run" / "drafter")
    assert drafter.config.target_name_or_path == f"tiny:{FAMILY}"
    assert "on 2 process(es)" in result.stdout


@pytest.mark.parametrize("fusion", ["cross_attention", "concat"])
def test_training_time_test_depths_are_the_drafts_generate_makes(tmp_path, fusion):
    """The trainer's unrolled forward, on a sequence whose response is what decoding drafted, gives at depth j the
    logits of `generate(assistant_model=drafter)`'s j-th draft of its first round (visual tokens all kept)."""
    from hf_dream.training.data import DreamDataCollator, response_row

    target = cached_target(FAMILY)
    drafter = DreamDraftModel.from_target(target, fusion=fusion, visual_keep_ratio=1.0).float()
    with torch.no_grad():
        if drafter.cross_block is not None:
            drafter.cross_block.attn_gate.fill_(0.7)
            drafter.cross_block.mlp_gate.fill_(0.5)
    depths = 4
    calls = []
    forward = drafter.forward

    def recording(*args, **kwargs):
        output = forward(*args, **kwargs)
        calls.append(output.logits[:, -1].detach().clone())
        return output

    inputs = make_tiny_inputs(target, seed=2)
    drafter.forward = recording
    output = target.generate(**inputs, max_new_tokens=depths + 2, do_sample=False, assistant_model=drafter, num_draft_tokens=depths)
    drafter.forward = forward
    drafts = calls[:depths]  # the prefill's last column (depth 1), then one call per further draft step
    prompt = inputs["input_ids"].shape[1]
    drafted = [int(logits.argmax(-1)) for logits in drafts]
    sequence = [int(output[0, prompt])] + drafted[:-1]  # the first new token, then the drafts as inputs
    row = response_row(dict(inputs), sequence)
    args = DreamTrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=1, report_to=[], use_cpu=True,
                                  ttt_steps=depths, mid_supervision="none")
    trainer = DreamTrainer(model=drafter, teacher=target, args=args, train_dataset=[row])
    batch = DreamDataCollator(target.generation_config.pad_token_id or 0)([row])
    drafter.eval()
    with torch.no_grad():
        unrolled, _, masks, _ = trainer._batch_outputs(drafter, batch)
    for depth in range(1, depths + 1):
        index = prompt + depth - 1  # no token is pruned: the index is the position
        # trained where the next token is in the sequence (the last draft's is not)
        assert bool(masks[depth - 1][0, index]) == (depth < depths)
        assert torch.allclose(unrolled[depth - 1].logits[0, index], drafts[depth - 1][0], atol=1e-4), depth
