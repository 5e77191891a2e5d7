"""Render TRAIN scenes [start, start+n) to a uint8 tensor file (experiment helper)."""
import sys, numpy as np, torch
from hf_dream.reference.scenes import scene_from_seed, TRAIN
start, n, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
arr = np.empty((n, 128, 128, 3), dtype=np.uint8)
for i in range(n):
    arr[i] = np.asarray(scene_from_seed(TRAIN.seed(start + i)).draw())
torch.save(torch.from_numpy(arr), out)
print("done", out)
