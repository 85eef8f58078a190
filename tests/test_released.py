"""The released protocols of the papers' code, by name: frame choice, MVSA labels and lists, the
test-selected protocol, grouped validation, AVE duplicates and shipped split lists; on tiny files in
the real layouts."""

from pathlib import Path

import numpy as np
import pytest
import torch
from media_files import write_jpgs

from poise.config import DataConfig, build_config, load_config_file
from poise.data import load_dataset
from poise.data.frames import frame_indices
from poise.data.lazy import FlowReader, FrameReader
from poise.data.media import ImageTransform

SMALL = {"image_size": 32}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


# ---- 2. frame choice --------------------------------------------------------------------------------
def test_named_frame_choices_pick_the_released_frames():
    # 10 frames, 3 per clip: OGM-GE reads files 1, 4, 7 (0-based 0, 3, 6) in train and test
    assert frame_indices(10, 3, "segment_starts", None) == [0, 3, 6]
    assert frame_indices(10, 3, "segment_starts", np.random.default_rng(0)) == [0, 3, 6]
    # BalanceBenchmark: random within each segment in training, the segment's first frame at test
    assert frame_indices(10, 3, "segments_then_starts", None) == [0, 3, 6]
    seen = {tuple(frame_indices(10, 3, "segments_then_starts", np.random.default_rng(s))) for s in range(40)}
    assert all(3 * i <= k < 3 * i + 3 for drawn in seen for i, k in enumerate(drawn)) and len(seen) > 5
    # poise's default: the middles at test (2, 5, 8 counted from 1)
    assert frame_indices(10, 3, "segments", None) == [1, 4, 7]
    assert frame_indices(10, 3, "first", np.random.default_rng(0)) == [0, 1, 2]
    assert frame_indices(10, 1, "middles", np.random.default_rng(0)) == frame_indices(10, 1, "middles", None) == [5]
    # BalanceBenchmark's UCF-101 RGB: the first six files only; 1, 3, 5 at test, one of 1-2, 3-4, 5-6 in training
    assert frame_indices(40, 3, "segments_then_starts", None, window=6) == [0, 2, 4]
    drawn = {k for s in range(40) for k in frame_indices(40, 3, "segments_then_starts", np.random.default_rng(s), window=6)}
    assert drawn == {0, 1, 2, 3, 4, 5}


def test_frame_reader_reads_the_chosen_files(tmp_path):
    write_jpgs(tmp_path / "clip", 10, names="frame_{:05d}.jpg")
    reader = FrameReader([tmp_path / "clip"], 3, "segment_starts", ImageTransform(16))
    assert [p.name for p in reader.frame_paths(0, None)] == ["frame_00001.jpg", "frame_00004.jpg", "frame_00007.jpg"]
    reader = FrameReader([tmp_path / "clip"], 3, "segments_then_starts", ImageTransform(16), window=6)
    assert [p.name for p in reader.frame_paths(0, None)] == ["frame_00001.jpg", "frame_00003.jpg", "frame_00005.jpg"]


def _ramp(folder, value):
    """Flow frames whose left half is 0 and right half ``value``: a flip is visible."""
    from PIL import Image

    folder.mkdir(parents=True)
    image = np.zeros((16, 16), np.uint8)
    image[:, 8:] = value
    for k in range(2):
        Image.fromarray(image, "L").save(folder / f"frame{k + 1:06d}.png")


def test_flow_flip_joint_negates_u_and_independent_does_not(tmp_path):
    _ramp(tmp_path / "u" / "c", 100)
    _ramp(tmp_path / "v" / "c", 200)
    transform = ImageTransform(16, "resize_flip", mean=None, std=None)
    readers = {flip: FlowReader(FrameReader([tmp_path / "u" / "c"], 1, "segments", transform, mode="L"),
                                [tmp_path / "v" / "c"], flip=flip) for flip in ("joint", "independent")}
    u_right = 100 / 255
    joint = [readers["joint"].read(0, np.random.default_rng(s))[0] for s in range(30)]
    for x in joint:
        v_flipped = x[1, 0, 0] > 0.5
        # the mirrored video's flow: u mirrored and negated (1 - u around mid-grey)
        expected_u = 1 - np.where(np.arange(16) < 8, u_right, 0.0) if v_flipped else np.where(np.arange(16) < 8, 0.0, u_right)
        np.testing.assert_allclose(x[0, 0], expected_u, atol=1e-6)
    independent = [readers["independent"].read(0, np.random.default_rng(s))[0] for s in range(30)]
    states = set()
    for x in independent:
        u_flipped, v_flipped = x[0, 0, 0] > 0, x[1, 0, 0] > 0
        assert set(np.round(x[0, 0] * 255).astype(int)) == {0, 100}  # never negated
        states.add((bool(u_flipped), bool(v_flipped)))
    assert (True, False) in states and (False, True) in states  # each its own flip


def test_presets_use_the_frames_of_the_quoted_paper():
    choices = {name: load_config_file(name).get("dataset", {}) for name in ("cremad_ogm_ge", "cremad_gblend", "cremad_mla", "vggsound_ogm_ge")}
    assert choices["cremad_ogm_ge"] == {"frames": 1, "frame_sampling": "first"}
    assert choices["cremad_gblend"] == choices["cremad_mla"] == {"frames": 2, "frame_sampling": "segments_then_starts"}
    assert choices["vggsound_ogm_ge"] == {"frames": 3, "frame_sampling": "first"}


# ---- 1. MVSA-Single ---------------------------------------------------------------------------------
MVSA_PAIRS = ["positive,positive", "neutral,negative", "positive,neutral", "negative,negative", "positive,negative",
              "neutral,neutral", "negative,positive", "neutral,positive"]


def write_mvsa(root, repeats=3):
    """MVSA-Single's layout: labelResultAll.txt (agreeing and disagreeing pairs), data/<ID>.jpg|txt."""
    lines = ["ID\ttext,image"]
    pairs = MVSA_PAIRS * repeats
    for i, pair in enumerate(pairs, start=1):
        write_jpgs(root / "data", 1, seed=i, names=f"{i}.jpg")
        (root / "data" / f"{i}.txt").write_text(f"post {i}")
        lines.append(f"{i}\t{pair}")
    (root / "labelResultAll.txt").write_text("\n".join(lines) + "\n")
    return pairs


def _all_labels(splits):
    return np.concatenate([s.labels.numpy() for s in (splits.train, splits.val, splits.test)])


def test_mvsa_both_labels_agree_by_default_and_neutral_yields_as_an_option(tmp_path):
    root = tmp_path / "mvsa"
    pairs = write_mvsa(root)
    agree = [p.split(",")[0] for p in pairs if p.split(",")[0] == p.split(",")[1]]
    splits = load_dataset(f"mvsa:{root}", {**SMALL, "split": "random", "test_fraction": 0.25}, DataConfig(val_fraction=0.2))
    assert len(_all_labels(splits)) == len(agree) == 9
    assert np.bincount(_all_labels(splits), minlength=3).tolist() == [3, 3, 3]  # negative, neutral, positive
    # MultiSentiNet's rule keeps the one-sided posts too: 3 more negative, 6 more positive
    loose = load_dataset(f"mvsa:{root}", {**SMALL, "split": "random", "test_fraction": 0.25, "label_rule": "neutral_yields"},
                         DataConfig(val_fraction=0.2))
    assert np.bincount(_all_labels(loose), minlength=3).tolist() == [6, 3, 9]


def test_mvsa_released_lists_are_the_default_split(tmp_path):
    import json

    root = tmp_path / "mvsa"
    pairs = write_mvsa(root)
    agreeing = [str(i) for i, p in enumerate(pairs, start=1) if p.split(",")[0] == p.split(",")[1]]
    lists = {"train.jsonl": agreeing[:5], "dev.jsonl": agreeing[5:7], "test.jsonl": agreeing[7:]}
    for name, ids in lists.items():
        # the released lines carry the label; one list without labels: taken from the label file
        (root / name).write_text("".join(json.dumps({"id": i, **({"label": pairs[int(i) - 1].split(",")[0]}
                                                                if name != "dev.jsonl" else {})}) + "\n" for i in ids))
    splits = load_dataset(f"mvsa:{root}", SMALL, DataConfig())
    assert (len(splits.train), len(splits.val), len(splits.test)) == (5, 2, 2)
    expected = [("negative", "neutral", "positive").index(pairs[int(i) - 1].split(",")[0]) for i in agreeing[5:7]]
    assert splits.val.labels.tolist() == expected
    assert "skipped" not in splits.notes
    (root / "test.jsonl").write_text('{"post": 3}\n')
    with pytest.raises(Exception, match=r"test.jsonl line 1: expected a JSON object with an 'id'"):
        load_dataset(f"mvsa:{root}", SMALL, DataConfig())
    (root / "test.jsonl").unlink()
    from poise.data.splitlists import shipped_list

    if shipped_list("mvsa", "test.jsonl") is None:
        with pytest.raises(Exception, match=r"released test list .* does not exist and poise ships none"):
            load_dataset(f"mvsa:{root}", SMALL, DataConfig())


# ---- 7. AVE's duplicated ids ------------------------------------------------------------------------
def _av_clips(root, clips, frames=3):
    from media_files import write_wav

    for i, clip in enumerate(clips):
        write_wav(root / "audio" / f"{clip}.wav", seconds=0.3, sample_rate=16000, seed=i)
        write_jpgs(root / "visual" / clip, frames, seed=i, names="frame_{:05d}.jpg")


def write_ave_with_duplicates(root):
    ids = [f"v{i:03d}" for i in range(6)]
    _av_clips(root, ids)
    cats = ["Church bell", "Male speech, man speaking", "Dog"]
    header = "Category&VideoID&Quality&StartTime&EndTime\n"
    line = lambda cat, i: f"{cats[cat]}&{ids[i]}&good&0&10\n"  # noqa: E731
    # v000 twice in the training list (first Church bell, then Dog); v001 in train and in test
    train = line(0, 0) + line(1, 1) + line(0, 2) + line(2, 0)
    test = line(1, 3) + line(0, 4) + line(1, 1)
    (root / "Annotations.txt").write_text(header + train + test)
    (root / "trainSet.txt").write_text(header + train)
    (root / "testSet.txt").write_text(header + test)
    return ids, sorted(cats)


def test_ave_keeps_the_last_line_of_a_duplicated_id_and_reports_duplicates(tmp_path):
    root = tmp_path / "ave"
    ids, classes = write_ave_with_duplicates(root)
    splits = load_dataset(f"ave:{root}", {**SMALL, "val_list": None}, DataConfig(val_fraction=0.34))
    assert splits.info.class_names == tuple(classes)
    train = torch.cat([splits.train.labels, splits.val.labels])
    assert len(train) == 3 and len(splits.test) == 3  # v000 once
    rows = splits.train.rows.tolist() + splits.val.rows.tolist()
    origins = {splits.train.origins[r].split(" (clip ")[1]: splits.train.all_labels[r].item() for r in rows}
    assert origins["'v000')"] == classes.index("Dog")  # the last line wins
    notes = splits.notes["duplicates"]
    assert len(notes) == 2
    assert "'v000' is listed 2 times" in notes[0] and "trainSet.txt line 2 (Church bell)" in notes[0] and "line 5 (Dog)" in notes[0]
    assert "'v001' is listed 2 times" in notes[1] and "it is in train and test" in notes[1]


def test_prepare_reports_ave_duplicates(tmp_path):
    from poise.data.prepare import TARGETS

    root = tmp_path / "ave"
    write_ave_with_duplicates(root)
    found = TARGETS["ave"].duplicates(root)
    assert [line.split("'")[1] for line in found] == ["v000", "v001"]


# ---- issue 10.12: official lists shipped with poise --------------------------------------------------
def _count_rows(path, header=False):
    lines = [x for x in path.read_text(encoding="utf-8-sig").splitlines() if x.strip()]
    return len(lines) - int(header)


@pytest.mark.parametrize("dataset,files", [
    ("cremad", {"train.csv": 6698, "test.csv": 744}),
    ("mvsa", {"train.jsonl": 1555, "dev.jsonl": 518, "test.jsonl": 519}),
    ("kinetics_sounds", {"my_train.txt": 14799, "my_test.txt": 2597, "class.txt": 31}),
])
def test_shipped_official_lists_have_the_published_sizes(dataset, files):
    from poise.data.splitlists import SHIPPED_DIR, shipped_list

    present = {name: shipped_list(dataset, name) for name in files}
    if not any(present.values()):
        pytest.skip(f"poise ships no {dataset} split list in {SHIPPED_DIR / dataset}")
    for name, expected in files.items():
        assert present[name] is not None, f"{dataset}/{name} is missing beside the other shipped lists"
        assert _count_rows(present[name]) == expected
    assert "MIT" in (SHIPPED_DIR / "NOTICE").read_text() or dataset != "cremad"


def test_shipped_kinetics_sounds_classes_name_every_listed_index_once():
    """The 31 names are distinct, every index the lists use names one of them, and each class has clips in
    both lists (a list shifted by one class, or one class short, fails here)."""
    from poise.data.splitlists import SHIPPED_DIR

    folder = SHIPPED_DIR / "kinetics_sounds"
    classes = [c for c in (folder / "class.txt").read_text().splitlines() if c.strip()]
    assert len(classes) == len(set(classes)) == 31
    assert classes == sorted(classes) and classes[2] == "bowling" and classes[4] == "dribbling basketball"
    for name in ("my_train.txt", "my_test.txt"):
        used = {int(line.strip().split(",")[-1]) for line in (folder / name).read_text().splitlines() if line.strip()}
        assert used == set(range(31)), name
    assert "kinetics_sounds/class.txt" in (SHIPPED_DIR / "NOTICE").read_text()


def test_kinetics_sounds_class_check_script_agrees_disagrees_and_refuses(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "check_ks", Path(__file__).resolve().parents[1] / "scripts" / "check_kinetics_sounds_classes.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "class.txt").write_text("bowling\nsinging\ntickling\n")
    (splits / "my_train.txt").write_text("aaaaaaaaaaa_000001_000011,10,0\nbbbbbbbbbbb_000002_000012,10,1\n")
    (splits / "my_test.txt").write_text("ccccccccccc_3,10,2\n")
    csv_path = tmp_path / "val.csv"
    csv_path.write_text("label,youtube_id,time_start,time_end,split\nbowling,aaaaaaaaaaa,1,11,val\n"
                        "singing,bbbbbbbbbbb,2,12,val\nabseiling,zzzzzzzzzzz,0,10,val\n")
    assert check.main([str(csv_path), "--splits", str(splits)]) == 0
    out = capsys.readouterr().out
    assert "0 bowling: 1 clips agree" in out and "2 of 3 classes witnessed; none for 2" in out
    csv_path.write_text("label,youtube_id,time_start,time_end,split\nbowling,aaaaaaaaaaa,1,11,val\n"
                        "tickling,ccccccccccc,3,13,test\nbowling,bbbbbbbbbbb,2,12,val\n")
    assert check.main([str(csv_path), "--splits", str(splits)]) == 1
    assert "1 singing: 0 clips agree; disagree: bowling (1)" in capsys.readouterr().out
    (tmp_path / "bad.csv").write_text("youtube_id,time_start\naaaaaaaaaaa,1\n")
    assert check.main([str(tmp_path / "bad.csv"), "--splits", str(splits)]) == 2
    assert "has no 'label' and 'youtube_id' columns" in capsys.readouterr().err


def test_shipped_notice_names_the_ogm_ge_licence():
    from poise.data.splitlists import SHIPPED_DIR

    text = (SHIPPED_DIR / "NOTICE").read_text()
    assert "Copyright (c) 2022 GeWu-Lab" in text and "MIT License" in text


def test_shipped_list_is_read_when_the_raw_folder_has_none_and_the_raw_list_wins(tmp_path, monkeypatch):
    from media_files import write_cremad

    import poise.data.splitlists as splitlists

    raw = tmp_path / "cremad"
    clips = write_cremad(raw)
    shipped = tmp_path / "shipped"
    (shipped / "cremad").mkdir(parents=True)
    for name in ("train.csv", "test.csv"):
        (raw / name).rename(shipped / "cremad" / name)
    monkeypatch.setattr(splitlists, "SHIPPED_DIR", shipped)
    splits = load_dataset(f"cremad:{raw}", SMALL, DataConfig(val_fraction=0.5))
    assert len(splits.train) + len(splits.val) == len(clips["train"]) and len(splits.test) == len(clips["test"])
    # a list in the raw folder wins over the shipped one
    (raw / "test.csv").write_text("".join(f"{c},{lab}\n" for c, lab in clips["test"][:2]))
    assert len(load_dataset(f"cremad:{raw}", SMALL, DataConfig(val_fraction=0.5)).test) == 2
    (shipped / "cremad" / "train.csv").unlink()
    with pytest.raises(Exception, match=r"CREMA-D train list '.*train.csv' does not exist, and poise ships no 'train.csv' for cremad"):
        load_dataset(f"cremad:{raw}", SMALL, DataConfig())


def test_shipped_kinetics_sounds_class_list_names_only_the_shipped_lists(tmp_path, monkeypatch):
    """A raw folder with clips alone reads the shipped lists and their class names; a folder with lists of
    its own and no class file keeps integer labels (its own class count), so the shipped 31 names never
    relabel, or refuse, a user's own list; ``prepare`` copies the class file only with the shipped lists."""
    import poise.data.splitlists as splitlists
    from poise.data.prepare import TARGETS

    clips = [f"vid{i:08d}_000001_000011" for i in range(8)]
    raw = tmp_path / "ks"
    _av_clips(raw, clips)
    shipped = tmp_path / "shipped"
    (shipped / "kinetics_sounds").mkdir(parents=True)
    (shipped / "kinetics_sounds" / "class.txt").write_text("bowling\nsinging\n")
    (shipped / "kinetics_sounds" / "my_train.txt").write_text("".join(f"{c},10,{i % 2}\n" for i, c in enumerate(clips[:6])))
    (shipped / "kinetics_sounds" / "my_test.txt").write_text("".join(f"{c},10,{i % 2}\n" for i, c in enumerate(clips[6:])))
    monkeypatch.setattr(splitlists, "SHIPPED_DIR", shipped)
    splits = load_dataset(f"kinetics_sounds:{raw}", SMALL, DataConfig(val_fraction=0.34))
    assert splits.info.class_names == ("bowling", "singing") and len(splits.test) == 2
    # the user's own lists, three classes, no class file
    (raw / "my_train.txt").write_text("".join(f"{c},10,{i % 3}\n" for i, c in enumerate(clips[:6])))
    (raw / "my_test.txt").write_text("".join(f"{c},10,{i % 3}\n" for i, c in enumerate(clips[6:])))
    splits = load_dataset(f"kinetics_sounds:{raw}", SMALL, DataConfig(val_fraction=0.34))
    assert splits.info.num_classes == 3 and splits.info.class_names == ("0", "1", "2")
    assert splitlists.shipped_list("kinetics_sounds", "class.txt", raw) is None
    (raw / "my_train.txt").unlink()
    (raw / "my_test.txt").unlink()
    assert splitlists.shipped_list("kinetics_sounds", "class.txt", raw) == shipped / "kinetics_sounds" / "class.txt"
    assert TARGETS["kinetics_sounds"].lists() == ("my_train.txt", "my_test.txt", "class.txt")


def test_prepare_copies_the_shipped_list_when_the_raw_folder_has_none(tmp_path, monkeypatch):
    from media_files import write_cremad

    import poise.data.splitlists as splitlists
    from poise.data import prepare

    raw, out = tmp_path / "raw", tmp_path / "out"
    write_cremad(raw)
    shipped = tmp_path / "shipped"
    (shipped / "cremad").mkdir(parents=True)
    (raw / "train.csv").rename(shipped / "cremad" / "train.csv")
    monkeypatch.setattr(splitlists, "SHIPPED_DIR", shipped)
    jobs, done = prepare.plan("cremad", raw, out)
    assert len(jobs) == 18  # every clip of both lists
    monkeypatch.setattr(prepare, "plan", lambda *a, **k: ([], 0))  # the lists only: no decoding here
    summary = prepare.run_prepare("cremad", raw, out, progress=False)
    assert summary["lists"] == {"train.csv": "shipped with poise", "test.csv": "raw folder"}
    assert (out / "train.csv").read_text() == (shipped / "cremad" / "train.csv").read_text()


# ---- 3. the released (test-selected) protocol --------------------------------------------------------
def test_val_fraction_zero_only_under_the_released_protocol():
    from poise.errors import ConfigError

    assert build_config({"data": {"protocol": "released"}}).data.val_fraction == 0
    assert build_config({}).data.protocol == "poise" and build_config({}).data.val_fraction == 0.15
    with pytest.raises(ConfigError, match="allowed only with data.protocol released"):
        build_config({"data": {"val_fraction": 0}})
    with pytest.raises(ConfigError, match="data.val_fraction must be 0 \\(it is 0.2\\)"):
        build_config({"data": {"protocol": "released", "val_fraction": 0.2}})


def _released_run(tmp_path, **data):
    from conftest import fast_config

    from poise.bench import run_bench

    cfg = fast_config(data={"protocol": "released", **data}, trainer={"epochs": 3})
    return run_bench("synthetic", ["joint"], [0], cfg, tmp_path / "bench", workers=1)


def test_released_protocol_trains_on_all_of_train_and_reports_test_selected_apart(tmp_path):
    from poise.bench import run_config
    from poise.data.registry import load_dataset as load

    results = _released_run(tmp_path)
    run = results["runs"][0]
    cfg = run_config("synthetic", {"data": {"protocol": "released"}})
    splits = load("synthetic", {}, cfg.data)
    assert len(splits.val) == 0 and len(splits.train) == len(load("synthetic", {}, DataConfig()).train) + len(
        load("synthetic", {}, DataConfig()).val)
    # poise's key holds the last epoch (nothing to select on); the test-selected number is apart
    assert run["selection"] == "last epoch" and run["best_epoch"] == 2
    per_epoch = [h["test_every_epoch"]["accuracy"] for h in run["history"]]
    chosen = run["released_test_selected"]
    assert chosen["selected_on"] == "test" and chosen["accuracy"] == max(per_epoch)
    assert chosen["epoch"] == per_epoch.index(max(per_epoch))
    assert run["test"]["accuracy"] == pytest.approx(per_epoch[-1])
    from poise.eval.report import write_report

    report = write_report(results, tmp_path / "bench").read_text()
    assert "test-selected accuracy (released protocol)" in report and "selected on the test split" in report


def test_poise_protocol_reports_no_test_selected_number(tmp_path):
    from conftest import fast_config

    from poise.bench import run_bench

    results = run_bench("synthetic", ["joint"], [0], fast_config(), tmp_path / "bench", workers=1)
    run = results["runs"][0]
    assert run["released_test_selected"] is None and run["selection"] == "validation"
    assert all("test_every_epoch" not in h for h in run["history"])
    from poise.eval.report import write_report

    assert "test-selected" not in write_report(results, tmp_path / "bench").read_text()


# ---- 4. grouped validation ----------------------------------------------------------------------------
def test_grouped_split_keeps_each_group_on_one_side():
    from poise.data.base import grouped_split

    groups = np.array([f"g{k:02d}" for k in range(8, 26) for _ in range(10)])  # 18 groups of 10
    for seed in range(5):
        keep, held = grouped_split(groups, 0.15, seed)
        assert set(groups[keep]).isdisjoint(groups[held])
        assert len(keep) + len(held) == len(groups) and len(held) == 30  # 27 wanted: 3 groups are closest
    assert grouped_split(groups, 0.15, 0)[1].tolist() != grouped_split(groups, 0.15, 1)[1].tolist()
    assert len(grouped_split(groups, 0.0, 0)[1]) == 0
    with pytest.raises(Exception, match="at least two groups"):
        grouped_split(np.array(["g01"] * 4), 0.5, 0)


def test_ucf101_validation_holds_out_whole_groups(tmp_path):
    root = tmp_path / "ucf"
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 Archery\n")
    train = [f"v_{c}_g{g:02d}_c{k:02d}" for g in range(8, 14) for c in ("ApplyEyeMakeup", "Archery") for k in (1, 2)]
    test = [f"v_{c}_g01_c01" for c in ("ApplyEyeMakeup", "Archery")]
    for i, v in enumerate(train + test):
        write_jpgs(root / "frames" / v, 3, size=(8, 8), seed=i)
        write_jpgs(root / "flow" / "u" / v, 3, size=(8, 8), seed=i, mode="L", names="frame{:06d}.jpg")
        write_jpgs(root / "flow" / "v" / v, 3, size=(8, 8), seed=i, mode="L", names="frame{:06d}.jpg")
    cls = lambda v: v.split("_")[1]  # noqa: E731
    (lists / "trainlist01.txt").write_text("".join(f"{cls(v)}/{v}.avi {1 + (cls(v) == 'Archery')}\n" for v in train))
    (lists / "testlist01.txt").write_text("".join(f"{cls(v)}/{v}.avi\n" for v in test))
    for seed in range(3):
        splits = load_dataset(f"ucf101:{root}", {"image_size": 8}, DataConfig(val_fraction=0.3, split_seed=seed))
        group = lambda ds: {ds.origins[r].split("_g")[1][:2] for r in ds.rows}  # noqa: E731
        assert group(splits.train).isdisjoint(group(splits.val))
        assert len(splits.val) == 8 and splits.notes["validation_groups"] == sorted(f"g{g}" for g in group(splits.val))
    flat = load_dataset(f"ucf101:{root}", {"image_size": 8, "grouped_validation": False}, DataConfig(val_fraction=0.3))
    assert "validation_groups" not in flat.notes


# ---- 5. IEMOCAP pickle pair order, MOSEI's zero ---------------------------------------------------------
def test_iemocap_pickle_pair_order_is_detected(tmp_path):
    import pickle

    from media_files import write_feature_pickle

    path = tmp_path / "iemocap_data.pkl"
    write_feature_pickle(path, {"train": 8, "valid": 4, "test": 4}, labels="iemocap")  # (negative, positive) pairs
    with open(path, "rb") as f:
        raw = pickle.load(f)
    expected = load_dataset(f"iemocap:{path}", {}, DataConfig()).train.labels.tolist()
    assert expected == [0, 1, 2, 3, 0, 1, 2, 3]
    for part in raw.values():
        part["labels"] = part["labels"][:, :, ::-1].copy()  # (positive, negative) pairs
    with open(path, "wb") as f:
        pickle.dump(raw, f)
    assert load_dataset(f"iemocap:{path}", {}, DataConfig()).train.labels.tolist() == expected
    stated = load_dataset(f"iemocap:{path}", {"pair_order": "positive_negative"}, DataConfig())
    assert stated.train.labels.tolist() == expected
    with pytest.raises(Exception, match="sample 0 has 3 positive emotions"):
        load_dataset(f"iemocap:{path}", {"pair_order": "negative_positive"}, DataConfig())


def test_mosei_zero_score_counts_as_positive_or_negative(tmp_path):
    import pickle

    from media_files import write_feature_pickle

    path = tmp_path / "mosei.pkl"
    write_feature_pickle(path, {"train": 4, "valid": 4, "test": 4})
    with open(path, "rb") as f:
        raw = pickle.load(f)
    for part in raw.values():
        part["labels"] = np.array([-1.5, 0.0, 0.0, 2.0], np.float32).reshape(4, 1, 1)
    with open(path, "wb") as f:
        pickle.dump(raw, f)
    balance = load_dataset(f"mosei:{path}", {}, DataConfig())
    assert balance.test.labels.tolist() == [0, 1, 1, 1] and balance.info.class_names == ("negative", "non-negative")
    mult = load_dataset(f"mosei:{path}", {"zero_is": "negative"}, DataConfig())
    assert mult.test.labels.tolist() == [0, 0, 0, 1] and mult.info.class_names == ("non-positive", "positive")


# ---- 6. text and images as released -------------------------------------------------------------------
def test_mvsa_with_a_tokenizer_follows_mla_and_food101_balancebenchmark(tmp_path):
    import json

    pytest.importorskip("transformers")
    from test_datasets_real import save_word_tokenizer, write_food101

    root = tmp_path / "mvsa"
    pairs = write_mvsa(root)
    agreeing = [str(i) for i, p in enumerate(pairs, start=1) if p.split(",")[0] == p.split(",")[1]]
    for name, ids in {"train.jsonl": agreeing[:5], "dev.jsonl": agreeing[5:7], "test.jsonl": agreeing[7:]}.items():
        (root / name).write_text("".join(json.dumps({"id": i}) + "\n" for i in ids))
    vocab = save_word_tokenizer(tmp_path / "bert", ["post", "1", "4"])
    splits = load_dataset(f"mvsa:{root}", {**SMALL, "tokenizer": str(tmp_path / "bert")}, DataConfig())
    assert splits.info.modalities["text"].shape == (256,)
    first = splits.test[0][0]["text"]  # "post 20" (20: unknown), no [CLS] / [SEP]
    assert first[:3].tolist() == [vocab["post"], vocab["[UNK]"], 0] and int(first.abs().sum()) == vocab["post"] + vocab["[UNK]"]
    with_special = load_dataset(f"mvsa:{root}", {**SMALL, "tokenizer": str(tmp_path / "bert"), "special_tokens": True,
                                                 "max_length": 5}, DataConfig())
    assert with_special.test[0][0]["text"].tolist() == [vocab["[CLS]"], vocab["post"], vocab["[UNK]"], vocab["[SEP]"], 0]
    words = load_dataset(f"mvsa:{root}", SMALL, DataConfig())
    assert words.info.modalities["text"].shape == (40,)  # the word vocabulary keeps 40
    food = tmp_path / "food"
    write_food101(food)
    splits = load_dataset(f"food101:{food}", {**SMALL, "tokenizer": str(tmp_path / "bert")}, DataConfig())
    text = splits.test[0][0]["text"]
    assert text.shape == (40,) and text[0] == vocab["[CLS]"]


def test_crop_jitter_transform_matches_torchvision_geometry_and_enhance():
    from PIL import Image, ImageEnhance

    from poise.data.imagetext import CropJitterTransform
    from poise.data.media import random_resized_crop_box

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8))
    t = CropJitterTransform(16)
    # evaluation: shorter side to 16 (bicubic): 16 x 27, then the centre 16 x 16 (left 6 as torchvision rounds)
    expected = image.resize((27, 16), Image.Resampling.BICUBIC).crop((6, 0, 22, 16))
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    reference = (np.asarray(expected, np.float32) / 255 - mean) / std
    np.testing.assert_allclose(t(image, None), reference.transpose(2, 0, 1), atol=1e-5)
    # training: the same draws, done by hand in the documented order
    out = t(image, np.random.default_rng(7))
    draw = np.random.default_rng(7)
    left, top, w, h = random_resized_crop_box(50, 30, draw)
    manual = image.resize((16, 16), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
    if draw.random() < 0.5:
        manual = manual.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    for k in draw.permutation(3):
        manual = enhancers[k](manual).enhance(float(draw.uniform(0.0, 2.0)))
    reference = (np.asarray(manual, np.float32) / 255 - mean) / std
    np.testing.assert_allclose(out, reference.transpose(2, 0, 1), atol=1e-5)


# ---- 5. IEMOCAP as MLA uses it ----------------------------------------------------------------------------
def write_iemocap_mla(root, tokens=True):
    """MLA's prepared IEMOCAP folder: lists, stat_iemo.txt, visual/<split>_imgs/<utt>/, audio fbank, BERT ids."""
    labels = ["Neutral", "Angry", "Sad", "Happy"]
    sessions = {"train": ["Ses01", "Ses02", "Ses03", "Ses04"], "test": ["Ses05"]}
    (root).mkdir(parents=True)
    (root / "stat_iemo.txt").write_text("\n".join(labels))
    for split, names in sessions.items():
        lines = []
        for s in names:
            for k in range(4):
                utt = f"{s}F_impro0{k}_F00{k}"
                lines.append(f"{utt}.mp4 [split|sign] words of {utt} [split|sign] {labels[k]}")
                write_jpgs(root / "visual" / f"{split}_imgs" / utt, 3, size=(20, 20), seed=k)
                (root / "audio" / f"{split}_fbank").mkdir(parents=True, exist_ok=True)
                np.save(root / "audio" / f"{split}_fbank" / f"{utt}.npy", np.full((12, 8), k, np.float32))
                if tokens:
                    (root / "text_token" / f"{split}_token").mkdir(parents=True, exist_ok=True)
                    np.save(root / "text_token" / f"{split}_token" / f"{utt}_token.npy", np.array([[101 + k, 7, 0, 0]]))
        (root / f"my_{split}_iemo.txt").write_text("\n".join(lines) + "\n")


def test_iemocap_mla_layout_with_sessions_kept_apart(tmp_path):
    root = tmp_path / "iemo"
    write_iemocap_mla(root)
    splits = load_dataset(f"iemocap_mla:{root}", {"image_size": 16}, DataConfig(val_fraction=0.25))
    assert splits.info.class_names == ("Angry", "Happy", "Neutral", "Sad")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 4, 4)
    assert len(splits.notes["validation_groups"]) == 1  # one whole session
    inputs, label, _, _ = splits.test[1]
    assert inputs["audio"].shape == (1, 12, 8) and float(inputs["audio"][0, 0, 0]) == 1.0  # utterance 1: Angry
    assert label == 0 and inputs["text"].tolist() == [102, 7, 0, 0]
    assert inputs["visual"].shape == (1, 3, 16, 16)
    assert splits.info.modalities["text"].kind == "tokens"


def test_iemocap_mla_reads_the_middle_frame(tmp_path):
    from poise.data.iemocap_mla import session

    root = tmp_path / "iemo"
    write_iemocap_mla(root, tokens=False)
    splits = load_dataset(f"iemocap_mla:{root}", {"image_size": 16}, DataConfig(val_fraction=0.25))
    reader = splits.train.readers["visual"]
    assert [p.name for p in reader.frame_paths(0, np.random.default_rng(0))] == ["00002.jpg"]  # of 3 frames
    assert splits.info.modalities["text"].shape == (40,)  # transcripts through the word vocabulary
    assert session("Ses03M_script01_3_F015") == "Ses03"
    (root / "my_test_iemo.txt").write_text("Ses05F_impro00_F000.mp4 [split|sign] hi [split|sign] Excited\n")
    with pytest.raises(Exception, match="my_test_iemo.txt line 1: label 'Excited' is not in the class list"):
        load_dataset(f"iemocap_mla:{root}", {"image_size": 16}, DataConfig())


def test_binary_tasks_match_a_hand_count():
    from poise.eval.metrics import binary_tasks

    labels = torch.tensor([0, 0, 1, 2, 3, 3])
    predicted = torch.tensor([0, 1, 1, 2, 3, 0])
    out = binary_tasks(predicted, labels, ["neutral", "happy", "sad", "angry"])
    # neutral: truth [1,1,0,0,0,0], guess [1,0,0,0,0,1]: 4 of 6 right; F1(yes) = 2*1/(2+2) = 0.5 (support 2),
    # F1(no) = 2*3/(4+4) = 0.75 (support 4): weighted (0.5*2 + 0.75*4) / 6
    assert out["neutral"]["accuracy"] == pytest.approx(4 / 6)
    assert out["neutral"]["f1"] == pytest.approx((0.5 * 2 + 0.75 * 4) / 6)
    assert out["sad"] == {"accuracy": 1.0, "f1": 1.0}


def test_iemocap_pickle_reports_mult_binary_tasks(tmp_path):
    from conftest import fast_config
    from media_files import write_feature_pickle

    from poise.bench import run_bench

    path = tmp_path / "iemocap_data.pkl"
    write_feature_pickle(path, {"train": 16, "valid": 8, "test": 8}, labels="iemocap")
    cfg = fast_config(dataset={"evaluation": "binary_tasks"}, trainer={"epochs": 1, "batch_size": 8})
    run = run_bench(f"iemocap:{path}", ["joint"], [0], cfg, tmp_path / "bench", workers=1)["runs"][0]
    tasks = run["test"]["binary_tasks"]
    assert set(tasks) == {"neutral", "happy", "sad", "angry"} and all(0 <= t["accuracy"] <= 1 for t in tasks.values())
