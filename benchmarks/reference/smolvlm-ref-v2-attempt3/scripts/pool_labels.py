"""Per-patch object-index maps (16x16, 0 = background, k+1 = the scene's k-th object in reading order) + per-object attributes."""
import sys, numpy as np, torch
from PIL import Image, ImageDraw
from hf_dream.reference.scenes import scene_from_seed, TRAIN, EVAL, SHAPES, COLORS, SIZES, _draw_object
def object_map(scene, side=128, patches=16):
    label = np.zeros((side, side), dtype=np.uint8)
    for k, obj in enumerate(scene.objects):
        canvas = Image.new("RGB", (side, side), (0, 0, 0))
        _draw_object(ImageDraw.Draw(canvas), side, obj)
        label[np.asarray(canvas).any(-1)] = k + 1
    p = side // patches
    blocks = label.reshape(patches, p, patches, p).transpose(0, 2, 1, 3).reshape(patches, patches, p * p)
    counts = np.stack([(blocks == v).sum(-1) for v in range(1, 5)], -1)  # object pixels per patch
    best = counts.argmax(-1)
    return np.where(counts.max(-1) >= p * p // 4, best + 1, 0).astype(np.uint8)  # an object covering >= 25% of the patch
def attributes(scene):
    a = np.full((4, 3), -1, dtype=np.int8)
    for k, o in enumerate(scene.objects):
        a[k] = (SHAPES.index(o.shape), sorted(COLORS).index(o.color) if False else list(COLORS).index(o.color), list(SIZES).index(o.size))
    return a
if __name__ == "__main__":
    start, n, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    split = EVAL if len(sys.argv) > 4 else TRAIN
    maps = np.empty((n, 16, 16), dtype=np.uint8); attrs = np.empty((n, 4, 3), dtype=np.int8)
    for i in range(n):
        s = scene_from_seed(split.seed(start + i))
        maps[i], attrs[i] = object_map(s), attributes(s)
    torch.save({"maps": torch.from_numpy(maps), "attrs": torch.from_numpy(attrs)}, out)
    print("done", out)
