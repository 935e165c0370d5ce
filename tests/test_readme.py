"""The README's Python examples run as written, on small stand-ins for the user's data."""

import re
from pathlib import Path

import pytest
import torch
from torch import nn

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = _Mlp()

    def forward(self, x):
        return x + self.mlp(x)


def _tiny_vit():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32, num_labels=3,
    )
    return transformers, config


def test_readme_has_the_three_examples():
    assert len(_python_blocks()) == 3


def test_op_example(monkeypatch):
    x = torch.randn(2, 4, 3, 3)
    namespace = {"x": x, "threshold": 0.1}
    import lipkern

    _, namespace["other_stats"] = lipkern.remap_act_stats(x, 0.1, act="relu", channel_dim=1)
    exec(_python_blocks()[0], namespace)
    assert namespace["stats"].count.tolist() == [2 * 2 * 3 * 3] * 4


def test_convert_calibrate_save_example(tmp_path, monkeypatch):
    import lipkern

    monkeypatch.chdir(tmp_path)
    model = nn.Sequential(_Block(), _Block())
    namespace = {
        "lipkern": lipkern,
        "model": model,
        "calib_loader": [torch.randn(4, 5, 8) for _ in range(3)],
    }
    exec(_python_blocks()[1], namespace)
    assert (tmp_path / "thresholds.safetensors").is_file()
    assert model[0].mlp.fc1.input_remap.calibrated


def test_integration_example(tmp_path, monkeypatch):
    import lipkern

    transformers, config = _tiny_vit()
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    pretrained = transformers.ViTForImageClassification(config).state_dict()
    namespace = {
        "lipkern": lipkern,
        "torch": torch,
        "transformers": transformers,
        "config": config,
        "pretrained_state_dict": pretrained,
        "calib_loader": [torch.randn(2, 3, 16, 16) for _ in range(2)],
    }
    exec(_python_blocks()[2], namespace)
    model = namespace["model"]
    assert not lipkern.nn.remap_modules(model)  # the example ends with unconvert
    assert set(model.state_dict()) == set(pretrained)
    reloaded = torch.load(tmp_path / "converted.pt", weights_only=False)
    assert lipkern.nn.remap_modules(reloaded)
