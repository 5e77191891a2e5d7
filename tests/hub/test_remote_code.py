"""hf_dream.hub.remote_code: the drafter's code for users without hf-dream (`trust_remote_code=True`)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cached_target
from hub_helpers import no_network, saved_drafter
from safetensors.torch import load_file, save_file

from hf_dream import DreamDraftModel
from hf_dream.hub import HubFolderError, check_folder, export_remote_code, render_card


@pytest.fixture
def drafter_dir(tmp_path) -> Path:
    return saved_drafter(tmp_path)


ISOLATED_LOAD = r'''
import sys


class BlockHfDream:
    """Makes hf_dream unimportable in this process, as on a machine where it is not installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "hf_dream" or name.startswith("hf_dream."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked for this test)")
        return None


sys.meta_path.insert(0, BlockHfDream())
assert "hf_dream" not in sys.modules
try:
    import hf_dream  # noqa: F401
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("hf_dream is importable here: the test would prove nothing")

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForImageTextToText

drafter_dir, target_dir, inputs_path, out_path = sys.argv[1:5]
torch.set_num_threads(1)
drafter = AutoModel.from_pretrained(drafter_dir, trust_remote_code=True).eval()
target = AutoModelForImageTextToText.from_pretrained(target_dir).eval()
drafter.attach_target(target)
inputs = load_file(inputs_path)
with torch.no_grad():
    out = drafter(inputs_embeds=inputs["inputs_embeds"], position_ids=inputs["position_ids"], target_features=inputs["target_features"])
save_file({"logits": out.logits.contiguous()}, out_path)
print(type(drafter).__module__)
print(sorted(name for name in sys.modules if name.startswith("hf_dream")))
'''


def test_remote_code_loads_without_hf_dream_with_identical_logits(drafter_dir, tmp_path, monkeypatch):
    from transformers import AutoModel

    no_network(monkeypatch)
    target = cached_target("llava")
    target.save_pretrained(tmp_path / "target")
    written = export_remote_code(drafter_dir)
    assert sorted(p.name for p in written) == ["configuration_dream.py", "modeling_dream.py", "targets.py"]
    config = json.loads((drafter_dir / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamDraftModel"}
    exported = {p.stem for p in written}
    for path in written:  # self-contained: no hf_dream imports, relative imports only of exported siblings
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("hf_dream")
                assert node.level == 0 or (node.level == 1 and node.module in exported)
            elif isinstance(node, ast.Import):
                assert not any(alias.name.startswith("hf_dream") for alias in node.names)

    # With hf_dream installed, the package's class is used (no trust_remote_code needed).
    assert type(AutoModel.from_pretrained(drafter_dir)) is DreamDraftModel

    drafter = DreamDraftModel.from_pretrained(drafter_dir).eval()
    drafter.attach_target(target)
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "inputs_embeds": torch.randn(1, 7, drafter.config.hidden_size, generator=generator),
        "target_features": torch.randn(1, 7, drafter.config.hidden_size, generator=generator),
        "position_ids": torch.arange(7)[None],
    }
    save_file(inputs, tmp_path / "inputs.safetensors")
    with torch.no_grad():
        expected = drafter(**inputs).logits

    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    script = tmp_path / "isolated_load.py"
    script.write_text(ISOLATED_LOAD)
    completed = subprocess.run(
        [sys.executable, str(script), str(drafter_dir), str(tmp_path / "target"), str(tmp_path / "inputs.safetensors"), str(tmp_path / "out.safetensors")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    module, loaded = completed.stdout.strip().splitlines()[-2:]
    assert module.startswith("transformers_modules.") and module.endswith(".modeling_dream")
    assert loaded == "[]"
    torch.testing.assert_close(load_file(tmp_path / "out.safetensors")["logits"], expected, rtol=0, atol=0)

    # The exported folder is still pushable; a hand-edited code file is not.
    assert {f["path"] for f in check_folder(drafter_dir)} >= {"modeling_dream.py", "configuration_dream.py", "targets.py"}
    card = str(render_card(drafter_dir, license="apache-2.0"))
    assert "trust_remote_code=True" in card and "configuration_dream.py, modeling_dream.py, targets.py" in card
    modeling = drafter_dir / "modeling_dream.py"
    modeling.write_text(modeling.read_text().split("\n", 1)[1])
    with pytest.raises(HubFolderError, match="not written by export_remote_code"):
        check_folder(drafter_dir)
