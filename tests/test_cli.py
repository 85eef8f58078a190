import json
import subprocess
import sys

import pytest

from poise.cli import main

FAST = ["--set", "trainer.epochs=2", "--set", "trainer.progress=false", "--set", "trainer.tensorboard=false",
        "--set", "dataset.num_samples=200"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--dataset", "synthtic", "--method", "joint", "--out", "X"], "unknown dataset 'synthtic' (did you mean 'synthetic'?)"),
        (["train", "--dataset", "synthetic", "--method", "jiont", "--out", "X"], "unknown method 'jiont' (did you mean 'joint'?)"),
        (["train", "--dataset", "synthetic", "--method", "unimodal:vidual", "--out", "X"], "unknown modality 'vidual'"),
        (["train", "--dataset", "synthetic", "--method", "joint", "--out", "X", "--set", "trainer.epoch=3"],
         "unknown config key 'trainer.epoch' (did you mean 'trainer.epochs'?)"),
        (["train", "--dataset", "synthetic", "--method", "joint", "--out", "X", "--set", "traner.epochs=3"],
         "unknown config key 'traner'"),
        (["train", "--dataset", "synthetic", "--method", "joint", "--out", "X", "--set", "trainer.epochs=zero"],
         "invalid value 'zero' for 'trainer.epochs'"),
        (["train", "--dataset", "synthetic", "--method", "joint", "--out", "X", "--set", "method.jont.alpha=1"],
         "'method.jont' names an unknown method (did you mean 'joint'?)"),
        (["train", "--dataset", "synthetic", "--method", "joint", "--out", "X", "--set", "trainer.epochs"],
         "--set expects key=value"),
        (["train", "--dataset", "synthetic", "--method", "joint", "--out", "X", "--config", "nowhere.yaml"],
         "config file 'nowhere.yaml' does not exist"),
        (["bench", "--dataset", "synthetic", "--methods", "joint,ogmm", "--out", "X"], "unknown method 'ogmm'"),
        (["bench", "--dataset", "synthetic", "--seeds", "0,a", "--out", "X"], "--seeds expects comma-separated integers"),
        (["train", "--dataset", "synthetic", "--method", "joint", "--out", "X", "--set", "model.fusion=gated",
          "--set", "dataset.modalities.a.dim=2", "--set", "dataset.modalities.b.dim=2", "--set", "dataset.modalities.c.dim=2"],
         "exactly two modalities"),
        (["report", "nowhere"], "does not exist"),
        (["bench", "--dataset", "synthetic", "--methods", "joint[model.fuson=mfb]", "--out", "X"],
         "unknown config key 'model.fuson' (did you mean 'model.fusion'?)"),
        (["bench", "--dataset", "synthetic", "--methods", "joint[pretrain=masked]", "--out", "X"],
         "pretrain must be one of contrastive, augment"),
        (["bench", "--dataset", "synthetic", "--methods", "jont[model.fusion=mfb]", "--out", "X"], "unknown method 'jont'"),
        (["bench", "--dataset", "synthetic", "--methods", "joint[]", "--out", "X"], "the variant of 'joint[]' is empty"),
        (["bench", "--dataset", "synthetic", "--methods", "joint[model.fusion=mfb", "--out", "X"], "is not a method or a variant"),
        (["train", "--dataset", "synthetic", "--method", "joint[model.fusion=mfb]", "--out", "X"], "variants NAME[KEY=VALUE;...]"),
    ],
)
def test_bad_input_exits_2_with_one_sentence(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert err.startswith("poise: error: ") and len(err.splitlines()) == 1
    assert not (tmp_path / "X").exists()


def test_bad_yaml_config(tmp_path, capsys):
    bad = tmp_path / "c.yaml"
    bad.write_text("trainer: [1, 2")
    assert main(["train", "--dataset", "synthetic", "--method", "joint", "--out", str(tmp_path / "o"), "--config", str(bad)]) == 2
    assert "is not valid YAML" in capsys.readouterr().err


def test_train_writes_result_and_config_file_and_set_both_apply(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("trainer:\n  epochs: 3\n  lr: 0.02\n")
    out = tmp_path / "run"
    assert main(["train", "--dataset", "synthetic", "--method", "joint", "--seed", "1", "--out", str(out),
                 "--config", str(cfg), *FAST[2:], "--set", "trainer.probe=false"]) == 0
    run = json.loads((out / "result.json").read_text())
    assert run["config"]["trainer"]["epochs"] == 3 and run["config"]["trainer"]["lr"] == 0.02
    assert run["seed"] == 1 and run["method"] == "joint" and len(run["history"]) == 3


def test_bench_results_schema_report_and_plots(tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "--dataset", "synthetic", "--methods", "joint,unimodal:audio,unimodal:visual",
                 "--seeds", "0,1", "--out", str(out), *FAST]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == "synthetic"
    assert [(r["method"], r["seed"]) for r in results["runs"]] == [
        ("joint", 0), ("joint", 1), ("unimodal:audio", 0), ("unimodal:audio", 1), ("unimodal:visual", 0), ("unimodal:visual", 1)]
    for run in results["runs"]:
        assert set(run) == {"method", "seed", "config", "best_epoch", "train_seconds", "test", "history", "selection",
                            "released_test_selected"}
        assert run["selection"] == "validation" and run["released_test_selected"] is None
        assert set(run["test"]) == {"accuracy", "macro_f1", "unimodal_accuracy", "probe_accuracy"}
        assert isinstance(run["best_epoch"], int) and run["train_seconds"] > 0
        assert run["config"]["trainer"]["epochs"] == 2
    joint = results["runs"][0]["test"]
    assert set(joint["probe_accuracy"]) == {"audio", "visual"}
    report = (out / "report.md").read_text()
    assert "| joint | 2 |" in report and "probe visual" in report
    for png in ("unimodal_accuracy.png", "confidence_ratio.png"):
        assert (out / png).stat().st_size > 1000
    assert main(["report", str(out)]) == 0


def test_methods_all_expands_to_baselines_and_every_balancing_method():
    from poise.bench import expand_methods
    from poise.methods.registry import balancing_methods

    names = expand_methods("all", ("audio", "visual"))
    assert names[:3] == ["joint", "unimodal:audio", "unimodal:visual"]
    assert names[3:] == balancing_methods()


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "poise", "list"], capture_output=True, text=True, check=True)
    assert "methods: joint" in out.stdout


def test_variants_run_beside_their_base_with_their_own_config_and_pretraining(tmp_path):
    from poise.bench import split_methods

    assert split_methods("joint,joint[model.fusion=mfb;trainer.lr=0.02], ogm_ge") == [
        "joint", "joint[model.fusion=mfb;trainer.lr=0.02]", "ogm_ge"]
    out = tmp_path / "bench"
    methods = "joint,joint[model.fusion=mfb;trainer.lr=0.02],joint[pretrain=contrastive]"
    assert main(["bench", "--dataset", "synthetic", "--methods", methods, "--seeds", "0", "--out", str(out),
                 *FAST, "--set", "trainer.probe=false"]) == 0
    runs = {r["method"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert list(runs) == ["joint", "joint[model.fusion=mfb;trainer.lr=0.02]", "joint[pretrain=contrastive]"]
    plain, mfb, pre = runs.values()
    assert plain["config"]["model"]["fusion"] is None and plain["config"]["trainer"]["lr"] != 0.02
    assert mfb["config"]["model"]["fusion"] == "mfb" and mfb["config"]["trainer"]["lr"] == 0.02
    assert pre["config"] == plain["config"]
    assert (out / "runs" / "joint_pretrain_contrastive" / "seed0" / "pretrain" / "encoders.pt").is_file()
    # the pre-trained run starts elsewhere, so it ends elsewhere; the same config without it does not
    assert pre["history"][0]["train_loss"] != plain["history"][0]["train_loss"]
    assert "| joint[model.fusion=mfb;trainer.lr=0.02] | 1 |" in (out / "report.md").read_text()
