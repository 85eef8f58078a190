import json
import re
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
                            "released_test_selected", "notes"}
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


# ---- every bad input: one sentence, exit status 2, nothing half-written -------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

QUICK = ["--set", "trainer.epochs=1", "--set", "trainer.tensorboard=false", "--set", "trainer.probe=false",
         "--set", "dataset.num_samples=120"]
THREE = ["--set", "dataset.modalities.a.dim=2", "--set", "dataset.modalities.b.dim=2", "--set", "dataset.modalities.c.dim=2"]


def one_sentence(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("poise: error: ") and len(err.splitlines()) == 1, err
    assert "weights_only" not in err and "unsafe" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--dataset", "synthetic", "--method", "joint", "--out", "afile"], "--out 'afile' is a file"),
        (["train", "--dataset", "synthetic", "--method", "joint", "--out", "afile/run"], "cannot be created: 'afile' is a file"),
        (["bench", "--dataset", "synthetic", "--methods", "joint", "--out", "afile"], "--out 'afile' is a file"),
        (["train", "--dataset", "synthetic", "--method", "joint", "--out", "X", "--seed", "-1"],
         "--seed must be an integer from 0 to 2**32 - 1, got -1"),
        (["bench", "--dataset", "synthetic", "--methods", "joint", "--out", "X", "--seeds", "0,-2"], "got -2"),
        (["pretrain", "--dataset", "synthetic", "--out", "X", "--seed", "-5"], "got -5"),
        (["train", "--dataset", "synthetic", "--method", "mla", "--out", "X", "--set", "dataset.modalities.a.dim=2"],
         "method 'mla' needs at least 2 modalities, the data has 1"),
        (["train", "--dataset", "synthetic", "--method", "joint", "--out", "X", "--set", "model.fusion=mfb", *THREE],
         "mfb fusion combines exactly two modalities, got 3"),
        (["bench", "--dataset", "synthetic", "--methods", "joint[model.fusion=mfb]", "--out", "X", *THREE],
         "mfb fusion combines exactly two modalities, got 3"),
        (["bench", "--dataset", "synthetic", "--methods", "mla", "--out", "X", "--set", "dataset.modalities.a.dim=2"],
         "method 'mla' needs at least 2 modalities"),
        (["train", "--dataset", "synthetic", "--method", "ogm_ge", "--out", "X", "--set", "method.ogm_ge.alpah=0.5"],
         "unknown option 'method.ogm_ge.alpah' (did you mean 'method.ogm_ge.alpha'?)"),
        (["bench", "--dataset", "synthetic", "--methods", "gblend", "--out", "X", "--set", "method.gblend.min_weigth=0.2"],
         "(did you mean 'method.gblend.min_weight'?)"),
        (["train", "--dataset", "synthetic", "--method", "unimodal", "--out", "X"], "the unimodal baseline needs a modality"),
        (["train", "--dataset", "synthetic", "--method", "unimodal:visual", "--out", "X",
          "--set", "method.unimodal.modality=audio"], "names modality 'visual' but method.unimodal.modality is 'audio'"),
        (["train", "--dataset", "synthetic", "--method", "joint", "--out", "X", "--config", "empty.yaml"],
         "config file 'empty.yaml' is empty"),
        (["train", "--dataset", "npz:text.npz", "--method", "joint", "--out", "X"], "'text.npz' is not a .npz archive"),
        (["train", "--dataset", "npz:empty.npz", "--method", "joint", "--out", "X"], "'empty.npz' is empty (0 bytes)"),
        (["train", "--dataset", "npz:pickle.npz", "--method", "joint", "--out", "X"], "'pickle.npz' is not a .npz archive"),
        (["train", "--dataset", "npz:array.npz", "--method", "joint", "--out", "X"], "is a single .npy array, not a .npz"),
        (["train", "--dataset", "npz:objects.npz", "--method", "joint", "--out", "X"], "array 'a' holds Python objects"),
        (["report", "norun"], "'norun/results.json' holds no runs"),
        (["report", "nodataset"], "'nodataset/results.json' is not a poise results file: it has no 'dataset' field"),
        (["report", "notjson"], "'notjson/results.json' is not a poise results file: it is not JSON (Expecting value at "
                                "line 1, column 13)"),
    ],
)
def test_bad_inputs_of_the_first_hour(argv, message, capsys, tmp_path, monkeypatch):
    import pickle

    import numpy as np

    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "text.npz").write_text("labels,a\n0,1\n")
    (tmp_path / "empty.npz").write_bytes(b"")
    (tmp_path / "pickle.npz").write_bytes(pickle.dumps({"labels": [0, 1]}))
    with open(tmp_path / "array.npz", "wb") as f:
        np.save(f, np.zeros(3))
    np.savez(tmp_path / "objects.npz", labels=np.array([0, 1]), a=np.array([{"x": 1}, None], dtype=object))
    (tmp_path / "norun").mkdir()
    (tmp_path / "norun" / "results.json").write_text('{"dataset": "synthetic", "runs": []}')
    (tmp_path / "nodataset").mkdir()
    (tmp_path / "nodataset" / "results.json").write_text('{"runs": []}')
    (tmp_path / "notjson").mkdir()
    (tmp_path / "notjson" / "results.json").write_text('{"dataset": ')
    assert main(argv) == 2
    assert message in one_sentence(capsys)
    assert not (tmp_path / "X").exists()
    assert (tmp_path / "afile").read_text() == "not a folder"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=64))
def test_any_file_that_is_not_an_npz_archive_is_one_sentence(data, tmp_path, capsys):
    from poise.data import load_dataset
    from poise.errors import DataError
    from poise.config import DataConfig

    path = tmp_path / "f.npz"
    path.write_bytes(data)
    with pytest.raises(DataError) as err:
        load_dataset(f"npz:{path}", {}, DataConfig())
    text = str(err.value)
    assert str(path) in text and len(text.splitlines()) == 1 and "allow_pickle" not in text and "unsafe" not in text


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(max_value=-1))
def test_any_negative_seed_is_refused_before_anything_is_written(seed, tmp_path, capsys):
    out = tmp_path / "neg"
    assert main(["train", "--dataset", "synthetic", "--method", "joint", "--out", str(out), "--seed", str(seed)]) == 2
    assert f"got {seed}" in one_sentence(capsys) and not out.exists()


def test_unwritable_out_folder(tmp_path, capsys, monkeypatch):
    import os

    monkeypatch.setattr(os, "access", lambda path, mode: False)  # the suite may run as root, who can write anywhere
    assert main(["train", "--dataset", "synthetic", "--method", "joint", "--out", str(tmp_path / "o")]) == 2
    assert f"cannot be written: no write permission in '{tmp_path}'" in one_sentence(capsys)


def test_an_existing_run_is_kept_unless_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--dataset", "synthetic", "--method", "joint", "--out", str(out), *QUICK,
            "--set", "trainer.tensorboard=true"]
    assert main(args) == 0
    events = sorted((out / "tensorboard").iterdir())
    first = (out / "result.json").read_text()
    capsys.readouterr()
    assert main(args) == 2
    refusal = one_sentence(capsys)
    assert "already holds a run" in refusal and "--resume" in refusal and "--overwrite" in refusal
    assert (out / "result.json").read_text() == first and sorted((out / "tensorboard").iterdir()) == events
    (out / "eval_test.json").write_text("{}")
    assert main([*args, "--overwrite"]) == 0
    new_events = sorted((out / "tensorboard").iterdir())
    assert len(new_events) == 1 and new_events != events  # the old run's TensorBoard events are gone
    assert not (out / "eval_test.json").exists()
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--overwrite"]) == 2
    assert "give one of them" in one_sentence(capsys)


def test_an_existing_bench_is_kept_unless_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["bench", "--dataset", "synthetic", "--methods", "joint", "--seeds", "0", "--out", str(out), *QUICK]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    assert "already holds a bench (results.json, report.md, runs)" in one_sentence(capsys)
    # a refused method keeps the earlier bench even with --overwrite
    bad = ["bench", "--dataset", "synthetic", "--methods", "mla", "--seeds", "0", "--out", str(out), *QUICK,
           "--set", "dataset.modalities.a.dim=2", "--overwrite"]
    assert main(bad) == 2
    assert "needs at least 2 modalities" in one_sentence(capsys) and (out / "results.json").is_file()
    assert main([*args, "--overwrite"]) == 0
    assert main([*args, "--resume"]) == 0


@pytest.mark.parametrize("content", [b"", b"\x80\x02garbage", b"PK\x03\x04truncated"])
def test_corrupt_or_empty_checkpoints_are_one_sentence(tmp_path, capsys, content):
    out = tmp_path / "run"
    assert main(["train", "--dataset", "synthetic", "--method", "joint", "--out", str(out), *QUICK]) == 0
    capsys.readouterr()
    (out / "checkpoint.pt").write_bytes(content)
    assert main(["train", "--resume", str(out)]) == 2
    assert f"cannot resume: '{out / 'checkpoint.pt'}'" in one_sentence(capsys)
    (out / "best.pt").write_bytes(content)
    assert main(["eval", str(out)]) == 2
    assert f"'{out / 'best.pt'}'" in one_sentence(capsys)


def test_readme_form_of_the_unimodal_baseline(tmp_path):
    out = tmp_path / "u"
    assert main(["train", "--dataset", "synthetic", "--method", "unimodal", "--set", "method.unimodal.modality=audio",
                 "--out", str(out), *QUICK]) == 0
    assert json.loads((out / "run.json").read_text())["method"] == "unimodal:audio"
    assert set(json.loads((out / "result.json").read_text())["test"]["unimodal_accuracy"]) == {"audio"}


# ---- long runs talk; every run folder describes itself -----------------------------------------------------
def test_one_line_per_epoch_without_a_terminal(tmp_path, capsys):
    assert main(["train", "--dataset", "synthetic", "--method", "ogm_ge", "--out", str(tmp_path / "r"), *QUICK,
                 "--set", "trainer.epochs=3"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ogm_ge epoch ")]
    assert len(lines) == 3
    assert re.fullmatch(r"ogm_ge epoch 2/3: train loss \d+\.\d{4}, val accuracy \d\.\d{4} \(audio \d\.\d{4}, visual "
                        r"\d\.\d{4}\), \d+\.\d s", lines[1])
    # a bench prints one line per run, not per epoch
    assert main(["bench", "--dataset", "synthetic", "--methods", "joint", "--seeds", "0", "--out", str(tmp_path / "b"),
                 *QUICK, "--set", "trainer.epochs=3"]) == 0
    assert " epoch " not in capsys.readouterr().out.replace("best epoch", "")


def test_bench_run_folders_hold_result_json_as_train_folders_do(tmp_path):
    assert main(["bench", "--dataset", "synthetic", "--methods", "joint,unimodal:audio", "--seeds", "0",
                 "--out", str(tmp_path / "b"), *QUICK]) == 0
    assert main(["train", "--dataset", "synthetic", "--method", "joint", "--out", str(tmp_path / "t"), *QUICK]) == 0
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    for run in results["runs"]:
        folder = tmp_path / "b" / "runs" / run["method"].replace(":", "_") / "seed0"
        assert json.loads((folder / "result.json").read_text()) == {"dataset": "synthetic", **run}
    single = json.loads((tmp_path / "t" / "result.json").read_text())
    bench_joint = json.loads((tmp_path / "b" / "runs" / "joint" / "seed0" / "result.json").read_text())
    assert set(single) == set(bench_joint)


def test_a_folder_written_by_the_library_api_is_read_by_poise_eval(tmp_path, capsys):
    from poise.bench import run_config, splits_for
    from poise.methods import make_method
    from poise.train import Trainer

    cfg = run_config("synthetic", set_layer={"trainer": {"epochs": 2, "progress": False, "tensorboard": False},
                                             "dataset": {"num_samples": 120}})
    out = tmp_path / "one"
    result = Trainer(splits_for("synthetic", cfg), make_method("ogm_ge", {"alpha": 0.3}), cfg, seed=1, out_dir=out).fit()
    run = json.loads((out / "run.json").read_text())
    assert (run["dataset"], run["method"], run["seed"]) == ("synthetic", "ogm_ge", 1)
    assert run["config"]["method"]["ogm_ge"] == {"alpha": 0.3}  # options given to the method object are kept
    assert json.loads((out / "result.json").read_text())["test"] == result.test
    assert main(["eval", str(out), "--no-drop-each"]) == 0
    scored = json.loads((out / "eval_test.json").read_text())["results"][0]
    assert scored["accuracy"] == result.test["accuracy"]
