"""The released loaders' audio features, recomputed without poise, and raw dataset folders to
compare them on (used by tests/test_audio_fidelity.py and scripts/audio_fidelity.py).

CREMA-D and VGGSound: the OGM-GE loaders, ``librosa.load`` then ``librosa.stft`` (librosa >= 0.10).
Kinetics-Sounds and AVE: ``torchaudio.load`` and ``torchaudio.compliance.kaldi.fbank(htk_compat=True,
sample_frequency=sr, use_energy=False, window_type='hanning', num_mel_bins=128, dither=0.0,
frame_shift=10)``, padded or cut to 1024 frames and normalised; the filter-bank is written out
here in float64, step by step from Kaldi's documentation (torchaudio is not needed).

A clip that exists only as a video is read as ``librosa.load`` would read the video's audio track:
every channel at the track's own rate (decoded with PyAV), the channel mean (channel 0 for
Kinetics-Sounds, whose released wavs keep both channels), resampled by librosa.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

KALDI_MEAN, KALDI_STD = -4.503877, 5.141276


# ---- reading a file as the released code does -------------------------------------------------------
def decode_track(path: Path) -> tuple[np.ndarray, int]:
    """(channels, n) float32 samples of a video's audio track at its own rate."""
    import av

    chunks, rate = [], None
    with av.open(str(path)) as container:
        for frame in container.decode(container.streams.audio[0]):
            rate = frame.sample_rate
            assert frame.format.name == "fltp", "the test videos carry AAC audio (planar float)"
            chunks.append(frame.to_ndarray())
    return np.concatenate(chunks, axis=1).astype(np.float32), rate


def librosa_load(path: Path, sr: int, mono: bool = True) -> np.ndarray:
    import librosa

    if Path(path).suffix == ".wav":
        return librosa.load(path, sr=sr, mono=mono)[0]
    channels, rate = decode_track(path)
    wave = librosa.to_mono(channels) if mono else channels
    return librosa.resample(wave, orig_sr=rate, target_sr=sr)


def torchaudio_load(path: Path) -> tuple[np.ndarray, int]:
    """(channels, n) float32 in [-1, 1) at the file's own rate, as torchaudio.load returns it."""
    import soundfile as sf

    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    return data.T, rate


# ---- CREMA-D and VGGSound (OGM-GE) --------------------------------------------------------------------
def log_spectrogram(samples: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    import librosa

    return np.log(np.abs(librosa.stft(samples, n_fft=n_fft, hop_length=hop)) + 1e-7)


def released_cremad(path: Path) -> np.ndarray:
    samples = librosa_load(path, 22050)
    resamples = np.tile(samples, 3)[:22050 * 3]
    resamples[resamples > 1.0] = 1.0
    resamples[resamples < -1.0] = -1.0
    return log_spectrogram(resamples, 512, 353)


def released_vggsound(path: Path, start: int) -> np.ndarray:
    """The released VGGSound features with the crop starting at sample ``start`` (the released
    loader draws it with ``random.randint(0, rate * 5)``, in training and at test time)."""
    sample, rate = librosa_load(path, 16000), 16000
    while len(sample) / rate < 10.0:
        sample = np.tile(sample, 2)
    new_sample = sample[start: start + rate * 5]
    new_sample[new_sample > 1.0] = 1.0
    new_sample[new_sample < -1.0] = -1.0
    return log_spectrogram(new_sample, 256, 128)


# ---- Kinetics-Sounds and AVE: Kaldi filter-bank ---------------------------------------------------------
def kaldi_mel(f):
    return 1127.0 * np.log(1.0 + f / 700.0)


def naive_kaldi_fbank(wave: np.ndarray, sr: int, bins: int = 128) -> np.ndarray:
    """Kaldi's fbank, float64, frame by frame: 25 ms frames every 10 ms (only whole frames,
    snip_edges), each frame's mean removed, pre-emphasis x[i] - 0.97 x[i-1] (x[-1] = x[0]), the
    "hanning" window 0.5 - 0.5 cos(2 pi i / (N - 1)), zero-padded to the next power of two,
    power spectrum, triangular filters equally spaced on Kaldi's mel scale 1127 ln(1 + f / 700)
    from 20 Hz to Nyquist over the bins below Nyquist, log with the float32 epsilon as floor.
    No dither, no energy term (use_energy=False makes htk_compat irrelevant)."""
    size, shift = int(sr * 0.025), int(sr * 0.010)
    padded = 1
    while padded < size:
        padded *= 2
    lo, hi = kaldi_mel(20.0), kaldi_mel(sr / 2)
    delta = (hi - lo) / (bins + 1)
    weights = np.zeros((bins, padded // 2 + 1))
    for b in range(bins):
        left, centre, right = lo + b * delta, lo + (b + 1) * delta, lo + (b + 2) * delta
        for k in range(padded // 2):
            m = kaldi_mel(k * sr / padded)
            if left < m < right:
                weights[b, k] = (m - left) / (centre - left) if m <= centre else (right - m) / (right - centre)
    window = np.array([0.5 - 0.5 * np.cos(2 * np.pi * i / (size - 1)) for i in range(size)])
    out = []
    for start in range(0, len(wave) - size + 1, shift):
        frame = np.asarray(wave[start: start + size], dtype=np.float64)
        frame = frame - frame.mean()
        frame = np.concatenate([[frame[0] - 0.97 * frame[0]], frame[1:] - 0.97 * frame[:-1]])
        spectrum = np.fft.rfft(np.concatenate([frame * window, np.zeros(padded - size)]))
        power = spectrum.real ** 2 + spectrum.imag ** 2
        out.append(np.log(np.maximum(weights @ power, np.finfo(np.float32).eps)))
    return np.array(out).reshape(-1, bins)


def released_fbank(waveform: np.ndarray, sr: int) -> np.ndarray:
    """The released Kinetics-Sounds / AVE loader on a (channels, n) waveform."""
    waveform = waveform - waveform.mean()
    fbank = naive_kaldi_fbank(waveform[0], sr)  # kaldi.fbank's channel=-1 reads channel 0
    out = np.zeros((1024, 128))
    out[: min(1024, len(fbank))] = fbank[:1024]
    return (out - KALDI_MEAN) / (KALDI_STD * 2)


def released_kinetics_sounds(path: Path) -> np.ndarray:
    """The released wavs are 16 kHz and keep both channels (``ffmpeg -ar 16000``). A file at another
    rate is resampled to 16 kHz first (poise's rule: the released loader would compute the
    filter-bank at the file's own rate, with other frame lengths and filters)."""
    if Path(path).suffix == ".wav" and torchaudio_load(path)[1] == 16000:
        return released_fbank(*torchaudio_load(path))
    return released_fbank(np.atleast_2d(librosa_load(path, 16000, mono=False)), 16000)


def released_ave(path: Path) -> np.ndarray:
    """The released wavs are 16 kHz mono (``ffmpeg -ac 1 -ar 16000``): other files are averaged
    over their channels and resampled to 16 kHz first."""
    if Path(path).suffix == ".wav" and torchaudio_load(path)[1] == 16000:
        return released_fbank(*torchaudio_load(path))
    return released_fbank(librosa_load(path, 16000)[None], 16000)



# ---- raw folders in the layouts ``poise prepare`` reads ------------------------------------------------------
@dataclass(frozen=True)
class Clip:
    """One test clip: a wav (``subtype`` PCM_16 as distributed, FLOAT to hold peaks above 1) or,
    with ``video``, only an mp4 with AAC audio."""

    name: str
    seconds: float
    rate: int
    channels: int = 1
    peak: float = 0.3
    subtype: str = "PCM_16"
    video: bool = False

    def describe(self) -> str:
        kind = "mp4 (AAC)" if self.video else f"wav {self.subtype}"
        return f"{kind} {self.rate} Hz {'mono' if self.channels == 1 else 'stereo'} {self.seconds} s peak {self.peak}"


def clip_signal(clip: Clip, seed: int) -> np.ndarray:
    """(n, channels): a chirp, a tone and noise, different in each channel, scaled to ``peak``
    (content below about 5 kHz, so that resampled clips have empty bands)."""
    rng = np.random.default_rng(seed)
    n = int(round(clip.seconds * clip.rate))
    t = np.arange(n) / clip.rate
    cols = []
    for c in range(clip.channels):
        f0 = 200 + 150 * c
        x = np.sin(2 * np.pi * (f0 * t + 300 * t ** 2 / max(clip.seconds, 1e-3)))
        x += 0.5 * np.sin(2 * np.pi * (1000 + 500 * c) * t) + 0.2 * rng.standard_normal(n)
        cols.append(x)
    x = np.stack(cols, axis=1)
    return (clip.peak * x / np.abs(x).max()).astype(np.float32)


CLIPS = {
    "cremad": [Clip("1001_DFA_NEU_XX", 1.2000625, 16000), Clip("1002_DFA_NEU_XX", 3.7, 44100, 2, peak=1.6, subtype="FLOAT"),
               Clip("1003_DFA_NEU_XX", 2.0, 22050, peak=0.9), Clip("1004_DFA_NEU_XX", 1.050125, 8000, 2),
               Clip("1005_DFA_NEU_XX", 2.0, 44100, 2, video=True)],
    "vggsound": [Clip("ytA_0", 10.0, 16000), Clip("ytB_30", 6.5, 44100, 2, peak=1.5, subtype="FLOAT"),
                 Clip("ytC_10", 3.0001, 22050), Clip("ytD_5", 12.0, 48000, 2), Clip("ytE_7", 3.0, 48000, 2, video=True)],
    "kinetics_sounds": [Clip("k0", 3.0, 16000, 2), Clip("k1", 11.0, 16000, 2, peak=0.9), Clip("k2", 10.0, 16000),
                        Clip("k3", 4.0, 44100, 2), Clip("k4", 3.0, 48000, 2, video=True)],
    "ave": [Clip("v0", 10.0, 16000), Clip("v1", 2.0, 16000), Clip("v2", 10.5, 22050, 2),
            Clip("v3", 3.0, 44100, 2, video=True)],
}


DATASETS = {
    # name: (audio folder, video folder, frames folder of the prepared root, cache folder)
    "cremad": ("AudioWAV", "VideoFlash", "Image-01-FPS", "spectrogram"),
    "vggsound": ("audio", "videos", "visual", "waveform"),
    "kinetics_sounds": ("audio", "videos", "visual", "fbank"),
    "ave": ("audio", "AVE", "visual", "fbank"),
}


def write_raw(dataset: str, raw: Path, out: Path, clips: list[Clip]) -> dict[str, Path]:
    """A raw folder with ``clips`` and the split lists, and the prepared root's frame folders made
    beforehand (so that ``poise prepare`` does only the audio). Returns each clip's raw audio source."""
    import soundfile as sf
    from media_files import write_video

    audio_dir, video_dir, frames_dir, _ = DATASETS[dataset]
    sources = {}
    for i, clip in enumerate(clips):
        if clip.video:
            path = raw / video_dir / f"{clip.name}.mp4"
            write_video(path, seconds=clip.seconds, fps=2, sample_rate=clip.rate, channels=clip.channels, seed=i)
        else:
            path = raw / audio_dir / f"{clip.name}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, clip_signal(clip, i), clip.rate, subtype=clip.subtype)
        sources[clip.name] = path
        (out / frames_dir / clip.name).mkdir(parents=True, exist_ok=True)
    names = [c.name for c in clips]
    if dataset == "cremad":
        (raw / "train.csv").write_text("".join(f"{c},NEU\n" for c in names))
        (raw / "test.csv").write_text("")
    elif dataset == "vggsound":
        (raw / "vggsound.csv").write_text("".join(f"{c.rsplit('_', 1)[0]},{c.rsplit('_', 1)[1]},dog,train\n" for c in names))
    elif dataset == "kinetics_sounds":
        (raw / "my_train.txt").write_text("".join(f"{c},10,0\n" for c in names))
        (raw / "my_test.txt").write_text("")
    else:
        header = "Category&VideoID&Quality&StartTime&EndTime\n"
        (raw / "trainSet.txt").write_text(header + "".join(f"Church bell&{c}&good&0&10\n" for c in names))
        (raw / "testSet.txt").write_text(header)
        (raw / "valSet.txt").write_text(header)
    return sources


class FixedStart:
    """Stands for the training generator: the VGGSound crop then starts at ``start``."""

    def __init__(self, start: int):
        self.start = start

    def integers(self, low, high, endpoint=False):
        assert low <= self.start <= high
        return self.start
