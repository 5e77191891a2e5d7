"""Transcript layouts: 64 token ids a scene's image tokens should spell (experiment helper)."""
from hf_dream.reference.scenes import NUMBER_WORDS

OBJECT_WIDTH = 12
COUNT_WIDTH = 5

def _ids(tok, s):
    return tok(s, add_special_tokens=False)["input_ids"]

def ordered(scene):
    return sorted(scene.objects, key=lambda o: (o.cell[1], o.cell[0]))

def count_phrase(n):
    return "There is one object:" if n == 1 else f"There are {NUMBER_WORDS[n]} objects:"

def layout(tok, scene, mode):
    space = _ids(tok, " ")[0]
    objs = ordered(scene)
    n = len(objs)
    if mode == "objfirst":  # packed, objects then background, spaces after
        things = [f"a {o.size} {o.color} {o.shape} {o.place}" for o in objs]
        listing = things[0] if n == 1 else ", ".join(things[:-1]) + f" and {things[-1]}"
        ids = _ids(tok, f"{count_phrase(n)} {listing}. The picture has {scene.background_phrase()}.")
    elif mode in ("fixed", "fixedbg"):  # count 5, objects 10 each (space-padded at the slot end), background sentence
        ids = _ids(tok, count_phrase(n))
        assert len(ids) == COUNT_WIDTH, (count_phrase(n), ids)
        for k, o in enumerate(objs):
            piece = _ids(tok, f" a {o.size} {o.color} {o.shape} {o.place}" + ("." if k == n - 1 else ","))
            assert len(piece) <= OBJECT_WIDTH
            ids += piece + [space] * (OBJECT_WIDTH - len(piece))
        if mode == "fixedbg":
            ids += _ids(tok, f" The picture has {scene.background_phrase()}.")
    else:
        raise ValueError(mode)
    ids = ids[:64]
    return ids + [space] * (64 - len(ids))
