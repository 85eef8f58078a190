"""report.md and the plots: how the bench ran, distinct colours, one quantity per panel, honest notes."""

import json

import numpy as np
from PIL import Image

from poise.eval.report import (MAX_QUANTITIES, _band, decision_plot_name, palette, quantity_label, split_record,
                               write_decision_plots, write_report)


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
    # every method that records gets its own plot of all its quantities, listed in the report
    assert "- [decisions/b.png](decisions/b.png)" in text and "- [decisions/c.png](decisions/c.png)" in text
    assert "decisions/m0" not in text
    json.dumps(results)  # the report never changes the results it reads


def test_each_method_that_records_gets_its_decision_plot(tmp_path):
    runs = [_run("joint", s) for s in (0, 1)]
    runs += [_run("pmr", s, records={"beta/audio": 0.0, "distance_own/audio": 2.0, "distance_other/audio": 3.0})
             for s in (0, 1)]
    phased = _run("reconboost[trainer.lr=0.2]", 0, epochs=4, records={"boost_rate": 1.0})
    for h, phase in zip(phased["history"], ["boost/audio", "rectify", "boost/visual", "rectify"]):
        h["phase"] = phase
    runs.append(phased)
    written = write_decision_plots({"dataset": "toy", "runs": runs}, tmp_path)
    assert written == ["decisions/pmr.png", "decisions/reconboost_trainer.lr_0.2_.png"]
    assert sorted(p.name for p in (tmp_path / "decisions").iterdir()) == ["pmr.png", "reconboost_trainer.lr_0.2_.png"]
    assert decision_plot_name("reconboost[trainer.lr=0.2]") == written[1]
    width, height = Image.open(tmp_path / "decisions" / "pmr.png").size
    assert width >= 900 and height >= 250  # three panels side by side, readable


def test_a_value_recorded_in_some_epochs_is_drawn_as_dots_at_those_epochs():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nan = float("nan")
    fig, ax = plt.subplots()
    _band(ax, np.array([[nan, 1.0, nan, nan, 3.0], [nan, 2.0, nan, nan, 5.0]]), "C0", "sparse")
    _band(ax, np.array([[1.0, 2.0, 3.0]]), "C1", "dense")
    sparse, dense = ax.get_lines()
    assert sparse.get_xdata().tolist() == [1, 4] and sparse.get_ydata().tolist() == [1.5, 4.0]
    assert sparse.get_marker() == "o" and dense.get_marker() in ("None", None, "")
    assert dense.get_xdata().tolist() == [0, 1, 2]
    plt.close(fig)


def test_a_quantity_named_alike_in_two_methods_is_labelled_for_each():
    assert quantity_label("pmr", "beta") != quantity_label("inforeg[trainer.lr=0.1]", "beta")
    assert quantity_label("ogm_ge+pmr", "beta") == quantity_label("pmr", "beta")
    assert quantity_label("relearning", "purity_gap") == "purity gap, training - validation (fraction)"
    assert quantity_label("x", "unknown") == "unknown (as recorded)"
