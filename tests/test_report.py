"""report.md and the plots: how the bench ran, distinct colours, one quantity per panel, honest notes."""

import json

import numpy as np
from PIL import Image

from poise.eval.report import MAX_QUANTITIES, palette, split_record, write_report


def _run(method, seed, epochs=3, records=None, ratio=True):
    rng = np.random.default_rng(seed)
    history = []
    for e in range(epochs):
        history.append({
            "epoch": e, "val": {"accuracy": 0.5 + 0.1 * e, "unimodal_accuracy": {"audio": 0.3, "visual": 0.6}},
            "confidence_ratio": {"audio": 0.5 + rng.random(), "visual": 1.5 + rng.random()} if ratio else {},
            "method": {k: (v if e == 0 else None) if k.startswith("once") else v + e for k, v in (records or {}).items()},
        })
    return {"method": method, "seed": seed, "train_seconds": 1.0, "best_epoch": epochs - 1,
            "config": {"trainer": {"threads": 1, "lr": 0.1 if method != "b" else 0.2}},
            "test": {"accuracy": 0.9, "macro_f1": 0.9, "unimodal_accuracy": {"audio": 0.3, "visual": 0.6},
                     "probe_accuracy": {"audio": 0.4, "visual": 0.7}}, "history": history}


def test_thirty_methods_get_thirty_distinct_colours():
    for n in (1, 10, 16, 30, 60):
        colours = palette(n)
        assert len(colours) == n and len(set(colours)) == n


def test_records_split_into_quantity_and_series():
    assert split_record("coef/audio") == ("coef", "audio")
    assert split_record("owm/head_grad_ratio/audio+visual") == ("owm/head_grad_ratio", "audio+visual")
    assert split_record("owm/trace") == ("owm/trace", "owm/trace")
    assert split_record("kd") == ("kd", "kd")


def test_report_records_command_versions_threads_configuration_and_truncation(tmp_path):
    many = {f"quantity{i}/audio": float(i) for i in range(MAX_QUANTITIES + 2)}
    runs = [_run(f"m{i}", s) for i in range(30) for s in (0, 1)]
    runs += [_run("b", s, records={"coef/audio": 0.5, "coef/visual": 1.0, "once/audio": 0.7}) for s in (0, 1)]
    runs += [_run("c", 0, records=many)]
    results = {"dataset": "toy", "command": "poise bench --dataset toy --methods all --out X",
               "environment": {"poise": "0.1.0", "torch": "2.13.0", "python": "3.11.7"}, "runs": runs}
    write_report(results, tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "Command: `poise bench --dataset toy --methods all --out X`" in text
    assert "Versions: poise 0.1.0, torch 2.13.0, python 3.11.7." in text
    assert "CPU threads per run (`trainer.threads`): 1." in text
    assert '"lr": 0.1' in text and "- `b`: `trainer.lr` = `0.2`" in text
    assert f"`c` records {MAX_QUANTITIES + 2} quantities; the first {MAX_QUANTITIES} are drawn" in text
    assert "sample standard deviation" in text
    for name in ("unimodal_accuracy.png", "confidence_ratio.png", "method_records.png"):
        assert f"![{name}]({name})" in text
        width, height = Image.open(tmp_path / name).size
        assert width >= 900 and height >= 350  # readable at 100 %, not a thumbnail
    json.dumps(results)  # the report never changes the results it reads
