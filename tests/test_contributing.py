"""CONTRIBUTING.md's example method is real: it trains, only ever slows an encoder, and is as short as
the guide says."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import fast_config, synthetic
from poise.train import Trainer

GUIDE = (Path(__file__).resolve().parents[1] / "CONTRIBUTING.md").read_text()


def example_source() -> str:
    blocks = re.findall(r"```python\n(.*?)```", GUIDE, flags=re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_the_example_method_trains_and_slows_the_dominant_modality():
    namespace: dict = {}
    exec(compile(example_source(), "CONTRIBUTING.md", "exec"), namespace)
    method = namespace["SlowDominant"]({"alpha": 0.8})
    splits, _ = synthetic(2, num_samples=160)  # audio carries the stronger signal
    result = Trainer(splits, method, fast_config(trainer={"epochs": 1}), seed=0).fit()
    coefficients = result.history[0]["method"]
    assert set(coefficients) == {"coef/audio", "coef/visual"}
    assert all(0.0 < k <= 1.0 for k in coefficients.values())  # only ever slows an encoder down
    assert min(coefficients.values()) < 0.9  # and did act


def test_the_guide_counts_the_example_lines_right():
    source = example_source()
    method = source[source.index("class SlowDominantParams"):]
    lines = [line for line in method.splitlines() if line.strip() and not line.strip().startswith("#")]
    count = int(re.search(r"That is (\d+) lines of code", GUIDE).group(1))
    assert len(lines) == count
