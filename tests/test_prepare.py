"""``poise prepare``: videos and audio decoded once into the cache the loaders read."""

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from media_files import cremad_clips, write_jpgs, write_moving_video, write_video, write_wav

from poise.cli import main
from poise.config import DataConfig
from poise.data import load_dataset
from poise.data.media import ClipSpectrogram, read_audio
from poise.data.prepare import REPORT, plan, run_prepare
from poise.errors import DataError


@pytest.fixture
def raw_cremad(tmp_path):
    """The distributed CREMA-D layout: VideoFlash/<clip>.<video>, AudioWAV/<clip>.wav, plus the
    released split lists. One clip has no video, one a corrupt video, one only a video (its audio
    comes from the video's track)."""
    raw = tmp_path / "raw"
    clips = cremad_clips(per_class_train=1, per_class_test=1)
    for split, rows in clips.items():
        raw.mkdir(exist_ok=True)
        (raw / f"{split}.csv").write_text("".join(f"{c},{lab}\n" for c, lab in rows))
    names = [c for rows in clips.values() for c, _ in rows]
    for i, clip in enumerate(names):
        if i == 0:
            continue  # no video at all
        if i == 1:
            (raw / "VideoFlash").mkdir(exist_ok=True)
            (raw / "VideoFlash" / f"{clip}.flv").write_bytes(b"FLV corrupt")
            continue
        write_video(raw / "VideoFlash" / f"{clip}.mp4", seconds=2.0, fps=4, seed=i)
        if i != 2:
            write_wav(raw / "AudioWAV" / f"{clip}.wav", seconds=0.5, sample_rate=16000, seed=i)
    return raw, names


def test_prepare_cremad_writes_the_loader_layout_and_lists_failures(raw_cremad, tmp_path):
    raw, names = raw_cremad
    out = tmp_path / "prepared"
    summary = run_prepare("cremad", raw, out, workers=1, progress=False)
    assert summary["clips"] == 12 and summary["prepared"] == 10 and summary["skipped"] == 2
    report = (out / REPORT).read_text().splitlines()
    assert len(report) == 3
    assert any(names[0] in line and "train.csv line 1" in line and "no audio file and no video" in line for line in report)
    assert any(names[1] in line and "cannot be decoded" in line for line in report)
    # frames at 1 fps from a 2 s video; the spectrogram of the wav when there is one, else of the video's track
    assert sorted(p.name for p in (out / "Image-01-FPS" / names[3]).iterdir()) == ["00001.jpg", "00002.jpg"]
    expected = ClipSpectrogram().cache_array(read_audio(raw / "AudioWAV" / f"{names[3]}.wav", 22050))
    np.testing.assert_allclose(np.load(out / "spectrogram" / f"{names[3]}.npy"), expected)
    assert np.load(out / "spectrogram" / f"{names[2]}.npy").shape == (257, 188)
    assert json.loads((out / "prepared.json").read_text())["audio"]["hop"] == 353
    # the prepared folder is a CREMA-D root: unreadable clips are refused, or skipped and listed
    with pytest.raises(DataError, match=rf"train.csv line 1 \(clip '{names[0]}'\)"):
        load_dataset(f"cremad:{out}", {"image_size": 32}, DataConfig())
    splits = load_dataset(f"cremad:{out}", {"image_size": 32, "on_missing": "skip"}, DataConfig(val_fraction=0.2))
    assert len(splits.train) + len(splits.val) + len(splits.test) == 10 and len(splits.notes["skipped"]) == 2
    assert splits.test[0][0]["audio"].shape == (1, 257, 188)


def test_prepare_resumes_only_what_is_missing(raw_cremad, tmp_path):
    raw, names = raw_cremad
    out = tmp_path / "prepared"
    run_prepare("cremad", raw, out, workers=1, progress=False)
    done = out / "spectrogram" / f"{names[5]}.npy"
    stamp = done.stat().st_mtime_ns
    (out / "spectrogram" / f"{names[6]}.npy").unlink()
    (out / "Image-01-FPS" / f".{names[7]}.tmp999").mkdir()  # left by an interrupted run
    jobs, already = plan("cremad", raw, out)
    assert already == 9 and sorted(j.clip for j in jobs) == sorted(names[:2] + [names[6]])
    assert next(j for j in jobs if j.clip == names[6]).frames_out is None  # its frames are there
    summary = run_prepare("cremad", raw, out, workers=2, progress=False)
    assert summary["already_prepared"] == 9 and summary["prepared"] == 1 and summary["skipped"] == 2
    assert done.stat().st_mtime_ns == stamp
    assert (out / "spectrogram" / f"{names[6]}.npy").is_file()
    assert not list((out / "Image-01-FPS").glob(".*"))


def test_prepare_cli_for_vggsound_and_kinetics_sounds(tmp_path, capsys):
    raw = tmp_path / "raw_vgg"
    rows = [(f"yt{i}", 10 * i, ("dog", "cat")[i % 2], "train" if i < 4 else "test") for i in range(6)]
    for i, (yt, start, _, _) in enumerate(rows):
        write_video(raw / "videos" / f"{yt}_{start}.mp4", seconds=3.0, fps=2, seed=i)
    (raw / "vggsound.csv").write_text("".join(f"{a},{b},{c},{d}\n" for a, b, c, d in rows))
    out = tmp_path / "vgg"
    assert main(["prepare", "vggsound", "--raw", str(raw), "--out", str(out), "--workers", "1"]) == 0
    assert "6 clips prepared, 0 already done, 0 skipped" in capsys.readouterr().out
    stored = np.load(out / "waveform" / "yt0_0.npy")
    decoded = read_audio(raw / "videos" / "yt0_0.mp4", 16000)  # about 3 s: stored untiled, tiled when read
    assert stored.dtype == np.float32 and abs(len(decoded) - 48000) < 2048
    np.testing.assert_array_equal(stored, decoded)
    splits = load_dataset(f"vggsound:{out}", {"image_size": 32}, DataConfig(val_fraction=0.5))
    assert splits.train[0][0]["audio"].shape == (1, 129, 626) and splits.train[0][0]["visual"].shape == (3, 3, 32, 32)
    torch.testing.assert_close(splits.test[0][0]["audio"], splits.test[0][0]["audio"])

    ks_raw = tmp_path / "raw_ks"
    for i in range(4):
        write_video(ks_raw / "videos" / "train" / f"k{i}.mp4", seconds=3.0, fps=2, seed=i)
    (ks_raw / "my_train.txt").write_text("k0,10,0\nk1,10,1\nk2,10,0\n")
    (ks_raw / "my_test.txt").write_text("k3,10,1\n")
    ks = tmp_path / "ks"
    assert main(["prepare", "kinetics_sounds", "--raw", str(ks_raw), "--out", str(ks), "--workers", "1"]) == 0
    assert np.load(ks / "fbank" / "k0.npy").shape == (1024, 128)
    assert (ks / "my_train.txt").is_file() and len(list((ks / "visual" / "k0").glob("*.jpg"))) == 3
    assert main(["prepare", "mosei", "--raw", str(ks_raw), "--out", str(ks)]) == 2
    assert "poise prepare knows cremad" in capsys.readouterr().err


# ---- UCF-101: RGB frames and optical flow ------------------------------------------------------------
UCF_CLASSES = ("ApplyEyeMakeup", "Archery")


@pytest.fixture
def raw_ucf101(tmp_path):
    """The distributed UCF-101 layout: UCF-101/<Class>/v_<Class>_gXX_cYY.avi and ucfTrainTestlist/.
    Every video shows a texture moving 2 px to the right per frame (flow u = 2, v = 0); one video
    is corrupt, one listed video is absent."""
    raw = tmp_path / "raw"
    videos = [f"v_{c}_g0{g}_c01" for g in range(1, 4) for c in UCF_CLASSES]
    for i, v in enumerate(videos):
        path = raw / "UCF-101" / v.split("_")[1] / f"{v}.avi"
        if i == 1:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"RIFF\x00\x00 not an avi")
        elif i != 5:
            write_moving_video(path, frames=6, seed=i)
    lists = raw / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_text("".join(f"{k + 1} {c}\n" for k, c in enumerate(UCF_CLASSES)))
    label = lambda v: 1 + UCF_CLASSES.index(v.split("_")[1])  # noqa: E731
    (lists / "trainlist01.txt").write_text("".join(f"{v.split('_')[1]}/{v}.avi {label(v)}\n" for v in videos[:4]))
    (lists / "testlist01.txt").write_text("".join(f"{v.split('_')[1]}/{v}.avi\n" for v in videos[4:]))
    return raw, videos


def test_prepare_ucf101_frames_and_quantised_flow(raw_ucf101, tmp_path):
    raw, videos = raw_ucf101
    out = tmp_path / "ucf"
    summary = run_prepare("ucf101", raw, out, workers=1, progress=False, flow="tvl1")
    assert summary["clips"] == 6 and summary["prepared"] == 4 and summary["skipped"] == 2
    assert summary["flow"]["method"] == "tvl1" and summary["flow"]["bound"] == 20
    report = (out / REPORT).read_text().splitlines()[1:]
    assert [line.split("\t")[:2] for line in report] == [[videos[1], "trainlist01.txt line 2"],
                                                         [videos[5], "testlist01.txt line 2"]]
    assert "cannot be decoded" in report[0] and "no video file" in report[1]
    assert (out / "ucfTrainTestlist" / "classInd.txt").is_file()
    # every frame as RGB; flow between consecutive frames, u and v with the same names
    frames = sorted(p.name for p in (out / "frames" / videos[0]).iterdir())
    flow_u = sorted(p.name for p in (out / "flow" / "u" / videos[0]).iterdir())
    assert frames == [f"frame{k:06d}.jpg" for k in range(1, 7)] and flow_u == frames[:-1]
    assert flow_u == sorted(p.name for p in (out / "flow" / "v" / videos[0]).iterdir())
    from PIL import Image

    u = np.asarray(Image.open(out / "flow" / "u" / videos[0] / flow_u[2]))
    v = np.asarray(Image.open(out / "flow" / "v" / videos[0] / flow_u[2]))
    assert u.ndim == 2 and u.dtype == np.uint8
    # 2 px to the right: (2 + 20) * 255 / 40 = 140.25; no vertical motion: mid-grey
    assert abs(np.median(u[8:-8, 8:-8]) - 140) <= 2 and abs(np.median(v[8:-8, 8:-8]) - 127.5) <= 2
    # the prepared folder is a UCF-101 root
    with pytest.raises(DataError, match="2 entries cannot be used"):
        load_dataset(f"ucf101:{out}", {"image_size": 32}, DataConfig())
    splits = load_dataset(f"ucf101:{out}", {"image_size": 32, "on_missing": "skip"}, DataConfig(val_fraction=0.34))
    assert len(splits.train) + len(splits.val) + len(splits.test) == 4 and len(splits.notes["skipped"]) == 2
    inputs = splits.test[0][0]
    assert inputs["visual"].shape == (3, 3, 32, 32) and inputs["flow"].shape == (3, 2, 32, 32)
    assert abs(float(inputs["flow"][:, 0, 8:-8, 8:-8].median()) - 140 / 255) < 0.02


def test_prepare_ucf101_resumes_and_farneback_from_the_cli(raw_ucf101, tmp_path, capsys):
    raw, videos = raw_ucf101
    out = tmp_path / "ucf"
    assert main(["prepare", "ucf101", "--raw", str(raw), "--out", str(out), "--workers", "1", "--flow", "farneback"]) == 0
    assert "4 clips prepared, 0 already done, 2 skipped" in capsys.readouterr().out
    assert json.loads((out / "prepared.json").read_text())["flow"]["method"] == "farneback"
    u = np.asarray(__import__("PIL.Image").Image.open(out / "flow" / "u" / videos[2] / "frame000003.jpg"))
    assert abs(np.median(u[8:-8, 8:-8]) - 140) <= 2
    # interrupted between u and v: only the flow of that video is redone, its frames are kept
    stamp = (out / "frames" / videos[3] / "frame000001.jpg").stat().st_mtime_ns
    kept = (out / "flow" / "u" / videos[0] / "frame000001.jpg").stat().st_mtime_ns
    shutil.rmtree(out / "flow" / "v" / videos[3])
    (out / "flow" / "u" / f".{videos[2]}.tmp999").mkdir()
    jobs, done = plan("ucf101", raw, out, flow="farneback")
    assert done == 3 and sorted(j.clip for j in jobs) == sorted([videos[1], videos[3], videos[5]])
    job = next(j for j in jobs if j.clip == videos[3])
    assert job.frames_out is None and job.flow_out is not None
    summary = run_prepare("ucf101", raw, out, workers=2, progress=False, flow="farneback")
    assert summary["already_prepared"] == 3 and summary["prepared"] == 1 and summary["skipped"] == 2
    assert len(list((out / "flow" / "v" / videos[3]).iterdir())) == 5
    assert (out / "frames" / videos[3] / "frame000001.jpg").stat().st_mtime_ns == stamp
    assert (out / "flow" / "u" / videos[0] / "frame000001.jpg").stat().st_mtime_ns == kept
    assert not list((out / "flow" / "u").glob(".*"))
    assert main(["prepare", "cremad", "--raw", str(raw), "--out", str(out), "--flow", "tvl1"]) == 2
    assert "--flow applies to ucf101 only" in capsys.readouterr().err


def test_flow_method_falls_back_to_farneback_without_opencv_contrib(monkeypatch):
    import types

    from poise.data.media import default_flow_method, flow_estimator, quantise_flow

    np.testing.assert_array_equal(quantise_flow(np.array([-25.0, -20.0, 0.0, 2.0, 20.0, 30.0])), [0, 0, 128, 140, 255, 255])
    assert default_flow_method() == "tvl1"  # the test extra installs opencv-contrib-python-headless
    plain = types.SimpleNamespace(calcOpticalFlowFarneback=lambda *a: np.zeros((4, 4, 2), np.float32))
    monkeypatch.setitem(sys.modules, "cv2", plain)  # an OpenCV build without the contrib modules
    assert default_flow_method() == "farneback"
    assert flow_estimator("farneback")(None, None).shape == (4, 4, 2)
    with pytest.raises(DataError, match="TV-L1 optical flow needs OpenCV's contrib modules"):
        flow_estimator("tvl1")
    monkeypatch.setitem(sys.modules, "cv2", None)  # no OpenCV at all
    with pytest.raises(DataError, match=r"'opencv-contrib-python-headless' package, part of the media extra"):
        default_flow_method()


# ---- Food-101 and MVSA: images made smaller once -------------------------------------------------------
def test_prepare_food101_and_mvsa_shrink_images_and_keep_the_layout(tmp_path):
    from PIL import Image

    raw = tmp_path / "food"
    rows = []
    for split, n in (("train", 6), ("test", 2)):
        for i in range(n):
            label = ("apple_pie", "ramen")[i % 2]
            name = f"{label}_{split}{i}.jpg"
            rows.append((split, name, f"{label} number {i}", label))
            if (split, i) == ("train", 1):
                continue  # listed, absent
            if (split, i) == ("train", 2):
                (raw / "images" / split / label).mkdir(parents=True, exist_ok=True)
                (raw / "images" / split / label / name).write_bytes(b"\xff\xd8 not a jpeg")
                continue
            write_jpgs(raw / "images" / split / label, 1, size=(600, 400) if i else (200, 150), seed=i, names=name)
    (raw / "texts").mkdir()
    for split in ("train", "test"):
        lines = ["image_path,text,label"] + [f"{n},{t},{lab}" for s, n, t, lab in rows if s == split]
        (raw / "texts" / f"{split}_titles.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "food_prepared"
    summary = run_prepare("food101", raw, out, workers=1, progress=False)
    assert (summary["clips"], summary["prepared"], summary["skipped"]) == (8, 6, 2)
    report = (out / REPORT).read_text()
    assert "train/ramen/ramen_train1.jpg\ttrain_titles.csv line 3\t" in report and "does not exist" in report
    assert "train/apple_pie/apple_pie_train2.jpg\ttrain_titles.csv line 4\t" in report and "cannot be read" in report
    with Image.open(out / "images" / "train" / "ramen" / "ramen_train3.jpg") as im:
        assert im.size == (384, 256)  # 600 x 400, shorter side 256, aspect kept
    with Image.open(out / "images" / "train" / "apple_pie" / "apple_pie_train0.jpg") as im:
        assert im.size == (200, 150)  # never enlarged
    assert (out / "texts" / "train_titles.csv").read_text() == (raw / "texts" / "train_titles.csv").read_text()
    splits = load_dataset(f"food101:{out}", {"image_size": 32, "on_missing": "skip"}, DataConfig(val_fraction=0.25))
    assert len(splits.train) + len(splits.val) + len(splits.test) == 6 and splits.test[0][0]["visual"].shape == (3, 32, 32)
    again = run_prepare("food101", raw, out, workers=1, progress=False)
    assert (again["already_prepared"], again["prepared"], again["skipped"]) == (6, 0, 2)

    raw = tmp_path / "mvsa"
    lines = ["ID\ttext,image"]
    for i in range(1, 7):
        write_jpgs(raw / "data", 1, size=(300, 500), seed=i, names=f"{i}.jpg")
        if i != 4:
            (raw / "data" / f"{i}.txt").write_text(f"post {i}")
        lines.append(f"{i}\t{('negative', 'positive')[i % 2]},neutral")
    (raw / "labelResultAll.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "mvsa_prepared"
    summary = run_prepare("mvsa", raw, out, workers=2, progress=False)
    assert (summary["prepared"], summary["skipped"]) == (5, 1)
    assert "4\tlabelResultAll.txt line 5\t" in (out / REPORT).read_text()
    with Image.open(out / "data" / "1.jpg") as im:
        assert im.size == (256, 427)
    assert (out / "data" / "1.txt").read_text() == "post 1" and not (out / "data" / "4.jpg").exists()
    splits = load_dataset(f"mvsa:{out}", {"image_size": 32, "on_missing": "skip", "test_fraction": 0.2, "split": "random",
                                             "label_rule": "neutral_yields"}, DataConfig(val_fraction=0.25))
    assert len(splits.train) + len(splits.val) + len(splits.test) == 5
