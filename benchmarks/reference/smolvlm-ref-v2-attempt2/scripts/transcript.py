"""Canonical slot transcript of a scene: 64 token ids (background 15, count 5, 4 objects x 11; " " fills)."""
from hf_dream.reference.scenes import NUMBER_WORDS
WIDTHS = (15, 5, 11, 11, 11, 11)
def transcript_ids(tok, scene):
    space = tok(" ", add_special_tokens=False)["input_ids"][0]
    objs = sorted(scene.objects, key=lambda o: (o.cell[1], o.cell[0]))
    n = len(objs)
    parts = [f"The picture has {scene.background_phrase()}.",
             " There is one object:" if n == 1 else f" There are {NUMBER_WORDS[n]} objects:"]
    for k, o in enumerate(objs):
        parts.append(f" a {o.size} {o.color} {o.shape} {o.place}" + ("." if k == n - 1 else ","))
    ids = []
    for k, width in enumerate(WIDTHS):
        piece = tok(parts[k], add_special_tokens=False)["input_ids"][:width] if k < len(parts) else []
        ids += piece + [space] * (width - len(piece))
    return ids
