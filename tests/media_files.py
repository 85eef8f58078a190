"""Tiny media files in the real datasets' layouts, written by the tests (nothing is downloaded)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

CREMAD = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")


def write_wav(path: Path, seconds: float = 0.5, sample_rate: int = 16000, seed: int = 0) -> None:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sf.write(path, (0.1 * rng.standard_normal(int(seconds * sample_rate))).astype(np.float32), sample_rate)


def write_jpgs(folder: Path, count: int, size=(40, 30), seed: int = 0, mode: str = "RGB", names: str = "{:05d}.jpg") -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    for k in range(count):
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(folder / names.format(k + 1))


def write_video(path: Path, seconds: float = 2.0, fps: int = 5, size=(32, 24), sample_rate: int = 16000,
                audio: bool = True, seed: int = 0, channels: int = 1) -> None:
    """An mp4 (MPEG-4 video, AAC audio: a 440 Hz tone, mono or stereo with a 660 Hz tone on the
    right) of random frames."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        video = container.add_stream("mpeg4", rate=fps)
        video.width, video.height, video.pix_fmt = size[0], size[1], "yuv420p"
        sound = None
        if audio:
            sound = container.add_stream("aac", rate=sample_rate)
            sound.layout = "mono" if channels == 1 else "stereo"
        for _ in range(int(seconds * fps)):
            image = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if sound is not None:
            n = int(seconds * sample_rate)
            tones = [440, 660][:channels]
            wave = np.stack([0.1 * np.sin(np.arange(n) * 2 * np.pi * f / sample_rate) for f in tones]).astype(np.float32)
            step = sound.codec_context.frame_size or 1024
            for start in range(0, n, step):
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave[:, start: start + step]), format="fltp",
                                                   layout="mono" if channels == 1 else "stereo")
                frame.sample_rate, frame.pts = sample_rate, start
                for packet in sound.encode(frame):
                    container.mux(packet)
            for packet in sound.encode():
                container.mux(packet)


def write_moving_video(path: Path, frames: int = 8, shift: int = 2, size=(64, 48), fps: int = 25, seed: int = 0) -> None:
    """A video without audio (MPEG-4 in an .avi, as UCF-101 is distributed) of a smooth random
    texture moving ``shift`` pixels to the right every frame: its optical flow is (shift, 0)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    phase = np.random.default_rng(seed).uniform(0, 2 * np.pi, 3)
    x = np.arange(size[0] + frames * shift)[None, :, None]
    y = np.arange(size[1])[:, None, None]
    texture = (127 + 50 * np.sin(2 * np.pi * x / 23 + phase) + 50 * np.sin(2 * np.pi * (x / 37 + y / 13) + phase[::-1]))
    texture = texture.clip(0, 255).astype(np.uint8)
    with av.open(str(path), "w") as container:
        video = container.add_stream("mpeg4", rate=fps)
        video.width, video.height, video.pix_fmt = size[0], size[1], "yuv420p"
        video.options = {"qscale": "2"}
        start = frames * shift
        for t in range(frames):
            image = np.ascontiguousarray(texture[:, start - t * shift: start - t * shift + size[0]])
            for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)


def cremad_clips(per_class_train: int = 2, per_class_test: int = 1) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    n = 0
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        for _ in range(per_class):
            for label in CREMAD:
                out[split].append((f"10{n:02d}_IEO_{label}_XX", label))
                n += 1
    return out


def write_cremad(root: Path, frames: int = 2, per_class_train: int = 2, per_class_test: int = 1) -> dict:
    """The released CREMA-D layout: train.csv / test.csv, AudioWAV/<clip>.wav, Image-01-FPS/<clip>/NNNNN.jpg."""
    clips = cremad_clips(per_class_train, per_class_test)
    for split, rows in clips.items():
        (root / f"{split}.csv").parent.mkdir(parents=True, exist_ok=True)
        (root / f"{split}.csv").write_text("".join(f"{c},{lab}\n" for c, lab in rows))
        for i, (clip, _) in enumerate(rows):
            write_wav(root / "AudioWAV" / f"{clip}.wav", seconds=0.4, sample_rate=16000, seed=i)
            write_jpgs(root / "Image-01-FPS" / clip, frames, seed=i)
    return clips


def write_feature_pickle(path: Path, n: dict[str, int], steps: int = 6, dims=(74, 35, 300), labels: str = "mosei",
                         seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    data = {}
    for split, count in n.items():
        part = {
            "audio": rng.standard_normal((count, steps, dims[0])).astype(np.float32),
            "vision": rng.standard_normal((count, steps, dims[1])).astype(np.float32),
            "text": rng.standard_normal((count, steps, dims[2])).astype(np.float32),
        }
        if labels == "mosei":
            part["labels"] = rng.uniform(-3, 3, (count, 1, 1)).astype(np.float32)
        else:
            flags = np.zeros((count, 4, 2), np.float32)
            flags[:, :, 0] = 1
            emotion = np.arange(count) % 4
            flags[np.arange(count), emotion] = (0, 1)
            part["labels"] = flags
        data[split] = part
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(data, f)
