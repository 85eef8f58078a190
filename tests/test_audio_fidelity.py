"""``poise prepare``'s audio features equal the released pipelines' on the same files: librosa
(>= 0.10) for CREMA-D and VGGSound, a naive float64 Kaldi filter-bank for Kinetics-Sounds and AVE
(tests/released_audio.py computes them without poise)."""

import math

import numpy as np
import pytest
import soundfile as sf
from released_audio import (
    CLIPS,
    DATASETS,
    Clip,
    FixedStart,
    librosa_load,
    naive_kaldi_fbank,
    released_ave,
    released_cremad,
    released_fbank,
    released_kinetics_sounds,
    released_vggsound,
    write_raw,
)

from poise.data.audiovisual import AUDIO_VISUAL_SETS
from poise.data.media import read_audio
from poise.data.prepare import run_prepare
from poise.errors import DataError

STFT_TOLERANCE = 1e-4


def prepare(dataset, tmp_path, clips=None):
    clips = clips or CLIPS[dataset]
    raw, out = tmp_path / "raw", tmp_path / "out"
    sources = write_raw(dataset, raw, out, clips)
    summary = run_prepare(dataset, raw, out, workers=1, progress=False)
    assert summary["prepared"] == len(clips) and summary["skipped"] == 0
    return sources, {c.name: np.load(out / DATASETS[dataset][3] / f"{c.name}.npy") for c in clips}


def test_the_test_clips_need_tiling_cutting_clipping_and_resampling():
    """The cases below cover what the issue lists (a guard against the clip lists drifting)."""
    cremad, vgg = CLIPS["cremad"], CLIPS["vggsound"]
    for clip, target in [(cremad[0], 22050), (vgg[2], 16000)]:  # tiled clips whose soxr output is one sample short
        n = round(clip.seconds * clip.rate) * target / clip.rate
        assert clip.seconds < 3 + 0.01 and not clip.video and math.ceil(n) == round(n) + 1
    assert any(c.seconds < 3 for c in cremad) and any(c.seconds > 3 for c in cremad)
    assert any(c.peak > 1 for c in cremad) and any(c.peak > 1 for c in vgg)
    assert any(c.seconds < 5 for c in vgg) and any(5 < c.seconds < 10 for c in vgg) and any(c.seconds > 10 for c in vgg)
    for clips in CLIPS.values():
        assert any(c.channels == 2 for c in clips) and any(c.video for c in clips)
        assert len({c.rate for c in clips}) >= 2
    fbank = CLIPS["kinetics_sounds"] + CLIPS["ave"]
    assert any(c.seconds < 10.24 for c in fbank) and any(c.seconds > 10.24 for c in fbank)


def test_read_audio_is_librosa_load(tmp_path):
    """Resampled length ceil(n * ratio) (soxr's output padded, as librosa.load pads it), channel mean."""
    clip = Clip("x", 1.0000625, 16000, channels=2)
    sources = write_raw("cremad", tmp_path / "raw", tmp_path / "out", [clip])
    ours = read_audio(sources["x"], 22050)
    n = sf.info(str(sources["x"])).frames
    assert n == 16001 and len(ours) == math.ceil(n * 22050 / 16000) == 22052  # soxr alone gives 22051
    np.testing.assert_array_equal(ours, librosa_load(sources["x"], 22050))
    assert read_audio(sources["x"], 22050, mono=False).shape == (2, len(ours))


def test_audio_track_of_a_video_is_the_channel_mean(tmp_path):
    clip = Clip("v", 1.0, 44100, channels=2, video=True)
    sources = write_raw("cremad", tmp_path / "raw", tmp_path / "out", [clip])
    ours = read_audio(sources["v"], 16000)
    both = read_audio(sources["v"], 16000, mono=False)
    np.testing.assert_allclose(ours, both.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(ours, librosa_load(sources["v"], 16000), atol=1e-6)
    assert np.abs(both[0]).max() > 0.05 and np.abs(both[1]).max() > 0.05  # two real channels


def test_prepared_cremad_spectrograms_are_the_released_ones(tmp_path):
    sources, stored = prepare("cremad", tmp_path)
    for name, array in stored.items():
        expected = released_cremad(sources[name])
        assert array.shape == expected.shape == (257, 188)
        np.testing.assert_allclose(array, expected, rtol=0, atol=STFT_TOLERANCE, err_msg=name)


def test_prepared_vggsound_waveform_gives_the_released_crops(tmp_path):
    sources, stored = prepare("vggsound", tmp_path)
    features = AUDIO_VISUAL_SETS["vggsound"].features
    for name, array in stored.items():
        samples = librosa_load(sources[name], 16000)
        # the cache: the first 10 s, float32, untiled (every crop reads only these)
        assert array.dtype == np.float32
        np.testing.assert_array_equal(array, samples[:160000])
        for start in (0, 12345, 80000):  # training: the released start, uniform in [0, 5 s]
            np.testing.assert_allclose(features.from_cache(array, FixedStart(start)), released_vggsound(sources[name], start),
                                       rtol=0, atol=STFT_TOLERANCE, err_msg=f"{name} at {start}")
        # evaluation: the centre of the first 10 s; never wraps a clip of 5 s or more round
        start = {"ytA_0": 40000, "ytB_30": 12000, "ytD_5": 40000}.get(name, 0)
        assert start + 80000 <= len(samples) or len(samples) < 80000
        np.testing.assert_allclose(features.from_cache(array, None), released_vggsound(sources[name], start),
                                   rtol=0, atol=STFT_TOLERANCE, err_msg=name)
    rng = np.random.default_rng(0)
    assert not np.array_equal(features.from_cache(stored["ytA_0"], rng), features.from_cache(stored["ytA_0"], rng))
    with pytest.raises(DataError, match="1-D float32 samples, got int16 .* prepare it again"):
        features.from_cache((stored["ytA_0"] * 32767).astype(np.int16), None)


def test_naive_kaldi_reference_puts_a_tone_in_its_mel_band():
    """The reference itself: a 1 kHz tone peaks in the band whose centre is nearest 1 kHz on
    Kaldi's mel scale, and a silent frame is log(float32 eps)."""
    sr, bins = 16000, 128
    t = np.arange(4000) / sr
    fbank = naive_kaldi_fbank(np.sin(2 * np.pi * 1000 * t), sr, bins)
    mel = lambda f: 1127 * np.log(1 + f / 700)  # noqa: E731
    centres = mel(20) + (np.arange(bins) + 1) * (mel(8000) - mel(20)) / (bins + 1)
    assert set(fbank.argmax(axis=1)) <= {int(np.argmin(np.abs(centres - mel(1000)))) + d for d in (-1, 0, 1)}
    assert fbank.shape == (1 + (4000 - 400) // 160, bins)
    np.testing.assert_allclose(naive_kaldi_fbank(np.zeros(400), sr, bins), np.log(np.finfo(np.float32).eps))


@pytest.mark.parametrize("dataset,reference", [("kinetics_sounds", released_kinetics_sounds), ("ave", released_ave)])
def test_prepared_filter_banks_are_the_released_ones(tmp_path, dataset, reference):
    sources, stored = prepare(dataset, tmp_path)
    for name, array in stored.items():
        expected = reference(sources[name])
        assert array.shape == expected.shape == (1024, 128)
        np.testing.assert_allclose(array, expected, rtol=0, atol=1e-5, err_msg=name)
    if dataset == "kinetics_sounds":  # the stereo clips tell channel 0 (released) from the channel mean
        name = next(c.name for c in CLIPS[dataset] if c.channels == 2 and not c.video)
        waveform = sf.read(str(sources[name]), dtype="float32", always_2d=True)[0].T
        assert np.abs(released_fbank(waveform.mean(axis=0, keepdims=True), 16000) - stored[name]).max() > 0.1
