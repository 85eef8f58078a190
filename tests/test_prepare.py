"""``poise prepare``: videos and audio decoded once into the cache the loaders read."""

import json

import numpy as np
import pytest
import torch
from media_files import cremad_clips, write_video, write_wav

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
    decoded = read_audio(raw / "videos" / "yt0_0.mp4", 16000)  # about 3 s, tiled 4 times to pass 10 s
    assert stored.dtype == np.int16 and len(stored) == 4 * len(decoded) and abs(len(decoded) - 48000) < 2048
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
    assert main(["prepare", "ucf101", "--raw", str(ks_raw), "--out", str(ks)]) == 2
    assert "poise prepare knows cremad" in capsys.readouterr().err
