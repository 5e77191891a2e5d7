"""Run by test_trainer.py under `torchrun --nproc_per_node 2`: DDP (gloo) training of a tiny drafter;
every rank saves its final weights so the test can compare them."""

import sys

import torch
from datasets import load_from_disk
from safetensors.torch import save_file

import hf_dream  # noqa: F401
from hf_dream import DreamDraftModel
from hf_dream.testing import build_tiny_target
from hf_dream.training import DreamTrainer, DreamTrainingArguments
from hf_dream.training.script import leave_process_group

out = sys.argv[1]
torch.set_num_threads(1)
target = build_tiny_target("llava")
torch.manual_seed(0)
drafter = DreamDraftModel.from_target(target)
args = DreamTrainingArguments(
    output_dir=f"{out}/run", max_steps=6, per_device_train_batch_size=2, learning_rate=1e-3, report_to=[],
    save_strategy="no", use_cpu=True, disable_tqdm=True, ddp_backend="gloo", logging_steps=2,
)
trainer = DreamTrainer(model=drafter, teacher=target, args=args, train_dataset=load_from_disk(f"{out}/data/dataset"))
rank = trainer.args.process_index
if rank == 0:
    save_file({k: v.contiguous() for k, v in drafter.state_dict().items()}, f"{out}/initial.safetensors")
trainer.train()
save_file({k: v.contiguous() for k, v in drafter.state_dict().items()}, f"{out}/rank{rank}.safetensors")
print(f"rank={rank} world_size={trainer.args.world_size}")
del trainer  # the DDP wrapper holds the process group; the group must go while the interpreter is alive
leave_process_group()
