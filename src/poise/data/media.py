"""Audio, image and video reading and the published preprocessing of the audio-visual datasets.

The media packages (soundfile and soxr for audio, PyAV for video, Pillow for images) are the optional
extra ``poise[media]``; they are imported when first needed, with an error naming the extra when one
is missing.

Audio is read as ``librosa.load`` (>= 0.10) reads it in the released loaders: the channel mean,
soxr "HQ" resampling, zero-padded to ``ceil(n * ratio)`` samples. Spectrograms are the numbers of
``librosa.stft`` (periodic Hann window, centred frames, zero padding, float64 FFT rounded to
complex64). The Kaldi filter-bank follows ``torchaudio.compliance.kaldi.fbank`` with the arguments
of the released Kinetics-Sounds / AVE code (hanning window, 25 ms frames, 10 ms shift, pre-emphasis
0.97, DC removal, 128 mel bins from 20 Hz to Nyquist, log power, no dither), on channel 0.
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Literal

import numpy as np

from poise.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SOUNDFILE_SUFFIXES = {".wav", ".flac", ".ogg", ".aiff", ".aif"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MEDIA_EXTRA = "pip install 'poise[media]'"


def require(module: str, package: str | None = None, extra: str = "media") -> ModuleType:
    """Import an optional package, or explain which extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"this dataset needs the '{package or module}' package, part of the {extra} extra: "
                        f"pip install 'poise[{extra}]'") from None


# ---- audio ------------------------------------------------------------------------------------------
def read_audio(path: Path, sample_rate: int, mono: bool = True) -> np.ndarray:
    """Float32 samples of an audio file (or of a video's audio track) at ``sample_rate``, as
    ``librosa.load(path, sr=sample_rate, mono=mono)`` gives them (librosa >= 0.10): the file's
    samples at its own rate, the channel mean (``mono``; else every channel, (channels, n)),
    resampled by soxr "HQ" and padded with zeros (or cut) to ``ceil(n * ratio)`` samples."""
    path = Path(path)
    if path.suffix.lower() in SOUNDFILE_SUFFIXES:
        sf = require("soundfile")
        try:
            data, rate = sf.read(str(path), dtype="float32", always_2d=True)
        except (RuntimeError, sf.LibsndfileError) as e:
            raise DataError(f"audio file '{path}' cannot be read: {e}") from None
        channels = data.T
    else:
        channels, rate = _decode_audio_track(path)
    if channels.shape[1] == 0:
        raise DataError(f"audio file '{path}' is empty (no samples)")
    wave = np.mean(channels, axis=0) if mono else channels  # librosa.to_mono, in float32
    return np.ascontiguousarray(resample(wave, rate, sample_rate), dtype=np.float32)


def resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    """``librosa.resample(wave, orig_sr=rate, target_sr=target)`` (>= 0.10: soxr "HQ", then
    ``fix_length`` to ``ceil(n * target / rate)``), on the last axis."""
    if rate == target:
        return wave
    soxr = require("soxr")
    n = int(np.ceil(wave.shape[-1] * (float(target) / rate)))
    rows = [soxr.resample(row, rate, target, quality="HQ") for row in wave.reshape(-1, wave.shape[-1])]
    out = np.zeros((len(rows), n), dtype=wave.dtype)
    for row, resampled in zip(out, rows):
        row[: min(n, len(resampled))] = resampled[:n]
    return out.reshape(*wave.shape[:-1], n)


def _decode_audio_track(path: Path) -> tuple[np.ndarray, int]:
    """(channels, n) float32 samples of a video's first audio track at its own rate. The channels
    are kept apart (planar) so that they are averaged as for a wav file: FFmpeg's own downmix to
    float mono is (L + R) / sqrt(2), 3 dB above the channel mean."""
    av = require("av")
    chunks, rate = [], None
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise DataError(f"'{path}' has no audio track")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="fltp")  # sample format only: rate and layout kept
            for frame in container.decode(stream):
                rate = rate or frame.sample_rate
                chunks += [f.to_ndarray() for f in resampler.resample(frame)]
            chunks += [f.to_ndarray() for f in resampler.resample(None)]
    except av.error.FFmpegError as e:
        raise DataError(f"media file '{path}' cannot be decoded: {e}") from None
    if not chunks:
        return np.zeros((1, 0), np.float32), rate or 1
    return np.concatenate(chunks, axis=1).astype(np.float32, copy=False), rate


def log_stft(wave: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """``np.log(np.abs(librosa.stft(wave, n_fft=n_fft, hop_length=hop)) + 1e-7)`` of a float32
    wave, (n_fft // 2 + 1, 1 + len // hop): centred frames, zero padding, periodic Hann window.
    As in librosa, the frames and their FFT are float64 and only the result is rounded to
    complex64 (a float32 FFT turns near-empty bands into rounding noise); the log is float32."""
    x = np.pad(np.asarray(wave, dtype=np.float32), n_fft // 2)
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    spec = np.fft.rfft(frames * window, axis=1).astype(np.complex64).T
    return np.log(np.abs(spec) + np.float32(1e-7))


def tile_to(wave: np.ndarray, length: int) -> np.ndarray:
    """Repeat a waveform until it has at least ``length`` samples."""
    return np.tile(wave, math.ceil(length / len(wave))) if len(wave) < length else wave


def _mel(f):
    return 1127.0 * np.log(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def kaldi_mel_banks(num_bins: int, padded_window: int, sample_rate: int, low_freq: float = 20.0,
                    high_freq: float = 0.0) -> np.ndarray:
    """Triangular mel filters on the FFT bins (num_bins, padded_window // 2 + 1), float64, Kaldi
    style (the Nyquist bin gets no weight)."""
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    mel_low, mel_high = _mel(low_freq), _mel(high_freq)
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = np.arange(num_bins)[:, None]
    left, center, right = mel_low + b * delta, mel_low + (b + 1) * delta, mel_low + (b + 2) * delta
    mel = _mel(sample_rate / padded_window * np.arange(padded_window // 2))[None, :]
    banks = np.maximum(0.0, np.minimum((mel - left) / (center - left), (right - mel) / (right - center)))
    return np.pad(banks, ((0, 0), (0, 1)))


def kaldi_fbank(wave: np.ndarray, sample_rate: int, num_mel_bins: int = 128, frame_length_ms: float = 25.0,
                frame_shift_ms: float = 10.0, preemphasis: float = 0.97) -> np.ndarray:
    """Log mel filter-bank energies (frames, num_mel_bins) as ``torchaudio.compliance.kaldi.fbank``
    gives them with the released arguments: snip_edges frames, no dither, per-frame DC removal,
    pre-emphasis, non-periodic Hann ("hanning") window, power spectrum, log with the float32
    epsilon as floor. Computed in float64, rounded to float32 at the end."""
    size = int(sample_rate * frame_length_ms / 1000)
    shift = int(sample_rate * frame_shift_ms / 1000)
    padded = 1 << (size - 1).bit_length()
    x = np.asarray(wave, dtype=np.float64)
    if len(x) < size:
        return np.zeros((0, num_mel_bins), np.float32)
    frames = np.lib.stride_tricks.sliding_window_view(x, size)[::shift]
    frames = frames - frames.mean(axis=1, keepdims=True)
    previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(size) / (size - 1))
    power = np.abs(np.fft.rfft((frames - preemphasis * previous) * window, n=padded, axis=1)) ** 2
    energies = power @ kaldi_mel_banks(num_mel_bins, padded, sample_rate).T
    return np.log(np.maximum(energies, np.finfo(np.float32).eps)).astype(np.float32)


# ---- the datasets' audio features -----------------------------------------------------------------
@dataclass(frozen=True)
class AudioFeatures:
    """One dataset's audio preprocessing. ``read`` decodes a file as the released loader does;
    ``cache_array`` is what ``poise prepare`` stores per clip (the deterministic part);
    ``from_cache`` finishes it at load time (random crops in training)."""

    sample_rate: int
    shape: tuple[int, ...]
    cache_dir: str
    mono: bool = True  # False: cache_array receives every channel, (channels, n)

    def read(self, path: Path) -> np.ndarray:
        return read_audio(path, self.sample_rate, mono=self.mono)

    def cache_array(self, wave: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def from_cache(self, stored: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        return stored

    def cache_shape(self) -> tuple[int, ...] | None:
        """The shape every cached array must have (None: any length)."""
        return self.shape[1:]

    def __call__(self, wave: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        return self.from_cache(self.cache_array(wave), rng)


@dataclass(frozen=True)
class ClipSpectrogram(AudioFeatures):
    """CREMA-D (OGM-GE): 22,050 Hz, tiled and cut to 3 s, clipped to [-1, 1], STFT n_fft 512 hop 353,
    log(|S| + 1e-7): 257 x 188. The released loader tiles three times (``np.tile(x, 3)``); poise
    tiles as often as needed, the same for every clip of 1 s or more."""

    sample_rate: int = 22050
    shape: tuple[int, ...] = (1, 257, 188)
    cache_dir: str = "spectrogram"
    seconds: float = 3.0
    n_fft: int = 512
    hop: int = 353

    def cache_array(self, wave):
        n = int(self.sample_rate * self.seconds)
        return log_stft(np.clip(tile_to(wave, n)[:n], -1.0, 1.0), self.n_fft, self.hop)


@dataclass(frozen=True)
class NormalisedFbank(AudioFeatures):
    """Kinetics-Sounds and AVE: 16 kHz, the mean of all samples removed, channel 0 (Kinetics-Sounds,
    ``mono`` False: its released wavs are stereo and ``kaldi.fbank`` reads the first channel; AVE,
    ``mono`` True: its released wavs are the channel mean, ``ffmpeg -ac 1``), Kaldi fbank (128 mel,
    10 ms shift), zero-padded or cut to 1024 frames, normalised ``(x - mean) / (2 std)`` with the
    AudioSet statistics: (1, 1024, 128), time first as in the released loader. The released loader
    computes the filter-bank at the wav's own rate (16 kHz for the released wavs); other rates are
    resampled to 16 kHz here."""

    sample_rate: int = 16000
    shape: tuple[int, ...] = (1, 1024, 128)
    cache_dir: str = "fbank"
    mono: bool = False
    norm_mean: float = -4.503877
    norm_std: float = 5.141276

    def cache_array(self, wave):
        frames, bins = self.shape[1:]
        wave = np.asarray(wave, dtype=np.float32)
        fbank = kaldi_fbank((wave - wave.mean()).reshape(-1, wave.shape[-1])[0], self.sample_rate, num_mel_bins=bins)
        out = np.zeros((frames, bins), np.float32)
        out[: min(frames, len(fbank))] = fbank[:frames]
        return (out - np.float32(self.norm_mean)) / np.float32(2 * self.norm_std)


@dataclass(frozen=True)
class CroppedSpectrogram(AudioFeatures):
    """VGGSound (OGM-GE): 16 kHz tiled to at least 10 s; a 5 s crop, clipped, STFT 256 / 128,
    log(|S| + 1e-7): 129 x 626. The crop starts at a uniform sample of [0, 5 s] in training (the
    released start). The released loader draws it at random at test time too; poise evaluates on a
    fixed crop, the centre of the clip's first 10 s (2.5 s for a full 10 s clip, the middle of the
    released range), which never wraps a clip of 5 s or more round. The cache holds the first 10 s
    of the waveform, float32 and untiled (all that any crop reads)."""

    sample_rate: int = 16000
    shape: tuple[int, ...] = (1, 129, 626)
    cache_dir: str = "waveform"
    seconds: float = 5.0
    min_seconds: float = 10.0
    n_fft: int = 256
    hop: int = 128

    def cache_shape(self):
        return None

    def cache_array(self, wave):
        return np.asarray(wave[: int(self.sample_rate * self.min_seconds)], dtype=np.float32)

    def from_cache(self, stored, rng):
        if stored.ndim != 1 or stored.dtype != np.float32 or len(stored) == 0:
            raise DataError(f"a cached VGGSound waveform must be 1-D float32 samples, got {stored.dtype} of shape "
                            f"{stored.shape} (a cache from an older poise prepare: prepare it again)")
        n = int(self.sample_rate * self.seconds)
        if rng is None:
            start = max(0, (len(stored) - n) // 2)
        else:
            start = int(rng.integers(0, n, endpoint=True))
        wave = tile_to(stored, int(self.sample_rate * self.min_seconds))
        return log_stft(np.clip(wave[start: start + n], -1.0, 1.0), self.n_fft, self.hop)


# ---- images ---------------------------------------------------------------------------------------
def read_image(path: Path, mode: str = "RGB"):
    """A decoded PIL image in ``mode`` (RGB for frames, L for optical flow)."""
    image_module = require("PIL.Image", "Pillow")
    try:
        with image_module.open(path) as im:
            im.load()
            return im if im.mode == mode else im.convert(mode)
    except FileNotFoundError:
        raise DataError(f"image file '{path}' does not exist") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"image file '{path}' cannot be read: {e}") from None


def list_images(folder: Path) -> list[str]:
    """The image file names of a frame folder, sorted (the released loaders take os.listdir order)."""
    return sorted(f for f in _listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))


def _listdir(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        raise DataError(f"frame folder '{folder}' does not exist") from None


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator, scale=(0.08, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, w, h) drawn as torchvision's RandomResizedCrop draws it (10 tries, then a
    centre crop within the ratio range)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


@dataclass(frozen=True)
class ImageTransform:
    """Training: ``augment`` = random_resized_crop (RandomResizedCrop(size) + flip), resize_flip
    (Resize + flip) or rotate_resize_flip (RandomRotation(rotate) + Resize + flip); evaluation, and
    training with ``augment: none``: Resize((size, size)). Then [0, 1] scaling and, when ``mean``
    is given, per-channel normalisation. Returns (C, size, size) float32."""

    size: int = 224
    augment: Literal["random_resized_crop", "resize_flip", "rotate_resize_flip", "none"] = "random_resized_crop"
    rotate: float = 30.0
    mean: tuple[float, ...] | None = IMAGENET_MEAN
    std: tuple[float, ...] | None = IMAGENET_STD

    def __call__(self, image, rng: np.random.Generator | None, flip: bool | None = None) -> np.ndarray:
        image_module = require("PIL.Image", "Pillow")
        bilinear = image_module.Resampling.BILINEAR
        size = (self.size, self.size)
        if rng is None or self.augment == "none":
            image = image.resize(size, bilinear)
        else:
            if self.augment == "random_resized_crop":
                left, top, w, h = random_resized_crop_box(image.width, image.height, rng)
                image = image.resize(size, bilinear, box=(left, top, left + w, top + h))
            else:
                if self.augment == "rotate_resize_flip":
                    image = image.rotate(float(rng.uniform(-self.rotate, self.rotate)), image_module.Resampling.NEAREST)
                image = image.resize(size, bilinear)
            if flip if flip is not None else rng.random() < 0.5:
                image = image.transpose(image_module.Transpose.FLIP_LEFT_RIGHT)
        x = np.asarray(image)
        x = np.ascontiguousarray((x[:, :, None] if x.ndim == 2 else x).transpose(2, 0, 1), dtype=np.float32)
        if self.mean is None:
            return x * np.float32(1 / 255)
        # (x / 255 - mean) / std as one multiply-add per channel, channels first (fast broadcasting)
        scale = (1 / (255 * np.asarray(self.std))).astype(np.float32)[:, None, None]
        offset = (np.asarray(self.mean) / np.asarray(self.std)).astype(np.float32)[:, None, None]
        x *= scale
        x -= offset
        return x


def sample_frame_indices(available: int, count: int, sampling: str, rng: np.random.Generator | None) -> list[int]:
    """Indices into a sorted frame list. ``first``: the first ``count`` frames. ``segments``: the
    list cut into ``count`` equal segments, one frame from each (random in training, the middle of
    the segment at evaluation), as the released Kinetics-Sounds / UCF-101 loaders pick them."""
    if sampling == "first":
        return list(range(count))
    segment = available // count
    if rng is None:
        return [i * segment + segment // 2 for i in range(count)]
    return [i * segment + int(rng.integers(0, segment)) for i in range(count)]


# ---- video ----------------------------------------------------------------------------------------
def iter_video_frames(path: Path, fps: float | None = None):
    """The decoded PyAV frames of a video, one at a time: every frame (``fps`` None) or the first
    frame at or after every 1 / fps seconds. Raises DataError for a file that cannot be decoded."""
    av = require("av")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(f"'{path}' has no video track")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = float(stream.average_rate or stream.guessed_rate or 25)
            next_time = 0.0
            for i, frame in enumerate(container.decode(stream)):
                time = frame.time if frame.time is not None else i / rate
                if fps is None or time + 1e-6 >= next_time:
                    yield frame
                    if fps is not None:
                        next_time += 1.0 / fps
    except av.error.FFmpegError as e:
        raise DataError(f"video file '{path}' cannot be decoded: {e}") from None


def video_frames(path: Path, fps: float) -> list:
    """PIL frames of a video at ``fps``: the first frame at or after every 1 / fps seconds."""
    return [frame.to_image() for frame in iter_video_frames(path, fps)]


# ---- optical flow ---------------------------------------------------------------------------------
FLOW_METHODS = ("tvl1", "farneback")
FLOW_BOUND = 20.0


def default_flow_method() -> str:
    """``tvl1`` when OpenCV has its contrib modules (``opencv-contrib-python-headless``, part of the
    media extra), else ``farneback`` (any OpenCV build)."""
    cv2 = require("cv2", "opencv-contrib-python-headless")
    return "tvl1" if hasattr(getattr(cv2, "optflow", None), "DualTVL1OpticalFlow_create") else "farneback"


def flow_estimator(method: str):
    """A function (previous, next) -> (H, W, 2) float32 flow in pixels between two greyscale uint8
    frames. ``tvl1``: OpenCV's Dual TV-L1 with its default parameters, the algorithm and settings
    of the released UCF-101 flow frames. ``farneback``: ``cv2.calcOpticalFlowFarneback`` (pyramid
    scale 0.5, 3 levels, window 15, 3 iterations, polynomial 5 / 1.2), about 30x faster on a CPU."""
    cv2 = require("cv2", "opencv-contrib-python-headless")
    if method == "tvl1":
        if not hasattr(getattr(cv2, "optflow", None), "DualTVL1OpticalFlow_create"):
            raise DataError("TV-L1 optical flow needs OpenCV's contrib modules: pip install opencv-contrib-python-headless "
                            "(or choose the farneback flow)")
        tvl1 = cv2.optflow.DualTVL1OpticalFlow_create()
        return lambda previous, current: tvl1.calc(previous, current, None)
    if method == "farneback":
        return lambda previous, current: cv2.calcOpticalFlowFarneback(previous, current, None, 0.5, 3, 15, 3, 5, 1.2, 0)
    raise DataError(f"optical flow method '{method}' is not one of {', '.join(FLOW_METHODS)}")


def quantise_flow(flow: np.ndarray, bound: float = FLOW_BOUND) -> np.ndarray:
    """Flow in pixels -> uint8 as the released TV-L1 frames store it: clipped to [-bound, bound] and
    mapped linearly onto [0, 255], ``round((f + bound) * 255 / (2 bound))``; zero motion is 127.5
    (mid-grey), so a loader's [0, 1] value ``x`` means ``(2 x - 1) * bound`` pixels."""
    scaled = np.round((np.asarray(flow, dtype=np.float32) + bound) * (255.0 / (2 * bound)))
    return np.clip(scaled, 0, 255).astype(np.uint8)
