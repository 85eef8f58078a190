"""The README stays true: it lists every config key and method, and its plain-PyTorch OGM-GE snippet runs."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from poise.config import config_keys
from poise.methods.registry import METHODS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_config_key_is_in_the_readme_table():
    keys = [k for k, *_ in config_keys() if "<" not in k]
    assert keys
    missing = [k for k in keys if f"| `{k}` |" not in README]
    assert not missing, f"README's configuration table lacks {missing}"


def test_every_method_is_described_in_the_readme():
    missing = [name for name in METHODS if f"`{name}`" not in README]
    assert not missing, f"README does not describe {missing}"


def ogm_snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    snippet = [b for b in blocks if "modulate_gradients" in b]
    assert len(snippet) == 1, "README has exactly one OGM-GE snippet"
    return snippet[0]


def test_the_ogm_ge_snippet_runs_and_slows_the_dominant_encoder():
    torch.manual_seed(0)
    # audio carries the label clearly, visual is noise: audio dominates
    y = torch.arange(64) % 4
    x_audio = F.one_hot(y, 4).float()[:, None, :, None].expand(64, 1, 4, 4) * 3 + 0.1 * torch.randn(64, 1, 4, 4)
    x_visual = torch.randn(64, 1, 4, 4)

    def conv_net():
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    audio_net, visual_net, fc = conv_net(), conv_net(), nn.Linear(8, 4)
    with torch.no_grad():  # make the audio path confident before the step
        fc.weight[:, :4] += 2 * torch.eye(4)
    initial = copy.deepcopy([audio_net, visual_net, fc])
    nets = nn.ModuleList([audio_net, visual_net, fc])
    optimizer = torch.optim.SGD(nets.parameters(), lr=0.1)
    namespace = {"torch": torch, "F": F, "audio_net": audio_net, "visual_net": visual_net, "fc": fc,
                 "loader": [(x_audio, x_visual, y)], "optimizer": optimizer, "epochs": 1}
    exec(compile(ogm_snippet(), "README snippet", "exec"), namespace)

    # naive reference of the coefficient: per-sample loop over the true-class probabilities
    a0, v0, fc0 = initial
    with torch.no_grad():
        h_a, h_v = a0(x_audio), v0(x_visual)
        s = {"audio": 0.0, "visual": 0.0}
        for i in range(len(y)):
            z_a = fc0.weight[:, :4] @ h_a[i] + fc0.bias / 2
            z_v = fc0.weight[:, 4:] @ h_v[i] + fc0.bias / 2
            s["audio"] += torch.softmax(z_a, 0)[y[i]].item()
            s["visual"] += torch.softmax(z_v, 0)[y[i]].item()
    rho_audio = s["audio"] / s["visual"]
    assert rho_audio > 1
    expected_audio_k = 1 - math.tanh(0.8 * rho_audio)
    k = namespace["k"]
    assert k.shape == (2,)
    assert abs(float(k[0]) - expected_audio_k) < 1e-5 and float(k[1]) == 1.0
    # the step happened: the encoders moved
    assert not torch.equal(a0[0].weight, audio_net[0].weight)
    assert not torch.equal(v0[0].weight, visual_net[0].weight)


def test_the_whole_loop_example_runs(tmp_path, monkeypatch):
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README, flags=re.S) if "Trainer(" in b]
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    code = blocks[0].replace('"epochs": 10', '"epochs": 1').replace("print(result.test)", "")
    namespace: dict = {}
    exec(compile(code, "README example", "exec"), namespace)
    test = namespace["result"].test
    assert set(test) == {"accuracy", "macro_f1", "unimodal_accuracy", "probe_accuracy"}
    assert (tmp_path / "runs" / "one" / "best.pt").is_file()
