"""How much faster an epoch of loading is from the ``poise prepare`` cache than from raw files.

Writes clips in a dataset's raw layout, prepares them, then times one pass over the training items:

- raw: every item decoded from the original files each time, as a loader without a cache would
  (the video decoded to take its 1 fps frames, the audio read, resampled and turned into the
  dataset's spectrogram / filter-bank, the frames transformed);
- released (CREMA-D only): the loader on wavs plus pre-extracted jpg frames, what OGM-GE reads;
- prepared: the loader on the prepared cache (.npy audio features + jpg frames).

Settings: ``cremad``: 2.5 s MPEG-4 videos of 480 x 360 at 30 fps and 16 kHz wavs (as distributed),
1 frame per item, 257 x 188 spectrogram. ``kinetics_sounds``: 10 s videos of 340 x 256 at 25 fps
with an AAC track at 44.1 kHz, 3 frames per item, 1024 x 128 Kaldi filter-bank.

    .venv/bin/python benchmarks/prepare_speed.py [--dataset cremad|kinetics_sounds|both] [--clips 24]

Prints milliseconds per item (wall clock and CPU time of the process) and the ratios raw / prepared.
CPU time is the steadier figure on a shared machine.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CREMAD_CLASSES = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")


def write_video(path: Path, seconds: float, fps: int, size: tuple[int, int], seed: int, audio_rate: int | None) -> None:
    import av

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    with av.open(str(path), "w") as container:
        video = container.add_stream("mpeg4", rate=fps)
        video.width, video.height, video.pix_fmt = size[0], size[1], "yuv420p"
        sound = container.add_stream("aac", rate=audio_rate) if audio_rate else None
        if sound is not None:
            sound.layout = "mono"
        for t in range(int(seconds * fps)):
            for packet in video.encode(av.VideoFrame.from_ndarray(np.roll(base, 4 * t, axis=1), format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if sound is not None:
            wave = (0.1 * rng.standard_normal(int(seconds * audio_rate))).astype(np.float32)
            step = sound.codec_context.frame_size or 1024
            for start in range(0, len(wave), step):
                frame = av.AudioFrame.from_ndarray(wave[None, start: start + step], format="flt", layout="mono")
                frame.sample_rate, frame.pts = audio_rate, start
                for packet in sound.encode(frame):
                    container.mux(packet)
            for packet in sound.encode():
                container.mux(packet)


def write_raw(dataset: str, raw: Path, count: int) -> list[str]:
    import soundfile as sf

    if dataset == "cremad":
        clips = [f"10{i:02d}_IEO_{CREMAD_CLASSES[i % 6]}_XX" for i in range(count)]
        for i, clip in enumerate(clips):
            write_video(raw / "VideoFlash" / f"{clip}.mp4", 2.5, 30, (480, 360), i, None)
            (raw / "AudioWAV").mkdir(parents=True, exist_ok=True)
            wave = (0.1 * np.random.default_rng(i).standard_normal(40000)).astype(np.float32)
            sf.write(raw / "AudioWAV" / f"{clip}.wav", wave, 16000)
        (raw / "train.csv").write_text("".join(f"{c},{c.split('_')[2]}\n" for c in clips))
        (raw / "test.csv").write_text(f"{clips[0]},{clips[0].split('_')[2]}\n")
    else:
        clips = [f"clip{i:03d}_000010_000020" for i in range(count)]
        for i, clip in enumerate(clips):
            write_video(raw / "videos" / f"{clip}.mp4", 10.0, 25, (340, 256), i, 44100)
        (raw / "my_train.txt").write_text("".join(f"{c},10,{i % 2}\n" for i, c in enumerate(clips)))
        (raw / "my_test.txt").write_text(f"{clips[0]},10,0\n")
    return clips


class Clock:
    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def raw_epoch(dataset: str, raw: Path, clips: list[str], image_size: int) -> Clock:
    from poise.data.media import ClipSpectrogram, ImageTransform, NormalisedFbank, read_audio, sample_frame_indices, video_frames

    transform = ImageTransform(image_size)
    rng = np.random.default_rng(0)
    with Clock() as clock:
        for clip in clips:
            if dataset == "cremad":
                features, frames = ClipSpectrogram(), 1
                audio, video = raw / "AudioWAV" / f"{clip}.wav", raw / "VideoFlash" / f"{clip}.mp4"
            else:
                features, frames = NormalisedFbank(), 3
                audio = video = raw / "videos" / f"{clip}.mp4"
            features(read_audio(audio, features.sample_rate), rng)
            images = video_frames(video, 1.0)
            for k in sample_frame_indices(len(images), frames, "first" if frames == 1 else "segments", rng):
                transform(images[k], rng)
    return clock


def loader_epoch(dataset: str, root: Path, image_size: int) -> tuple[Clock, int]:
    from poise.config import DataConfig
    from poise.data import load_dataset

    train = load_dataset(f"{dataset}:{root}", {"image_size": image_size}, DataConfig(val_fraction=0.1)).train
    with Clock() as clock:
        for i in range(len(train)):
            train[i]
    return clock, len(train)


def measure(dataset: str, count: int, image_size: int, workers: int, work: Path) -> None:
    from poise.data.prepare import run_prepare

    raw, prepared = work / f"{dataset}_raw", work / f"{dataset}_prepared"
    clips = write_raw(dataset, raw, count)
    with Clock() as prepare_clock:
        summary = run_prepare(dataset, raw, prepared, workers=workers, progress=False)
    per_item = {"raw": (raw_epoch(dataset, raw, clips, image_size), len(clips))}
    if dataset == "cremad":  # the released layout: the wavs beside the prepared frames, no spectrogram cache
        released = work / "cremad_released"
        shutil.copytree(raw / "AudioWAV", released / "AudioWAV")
        shutil.copytree(prepared / "Image-01-FPS", released / "Image-01-FPS")
        for name in ("train.csv", "test.csv"):
            shutil.copyfile(prepared / name, released / name)
        per_item["released"] = loader_epoch(dataset, released, image_size)
    per_item["prepared"] = loader_epoch(dataset, prepared, image_size)
    print(f"{dataset}: {count} clips, frames {image_size}px; prepare {prepare_clock.wall:.1f} s with {workers} workers "
          f"({summary['prepared']} prepared, {summary['skipped']} skipped)")
    ms = {name: (1000 * c.wall / n, 1000 * c.cpu / n) for name, (c, n) in per_item.items()}
    for name, (wall, cpu) in ms.items():
        print(f"  {name:<9} {wall:7.1f} ms per item wall, {cpu:7.1f} ms CPU")
    for other in [k for k in ms if k != "prepared"]:
        print(f"  speed-up of the prepared cache over {other}: {ms[other][0] / ms['prepared'][0]:.1f}x wall, "
              f"{ms[other][1] / ms['prepared'][1]:.1f}x CPU")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("cremad", "kinetics_sounds", "both"), default="both")
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=2, help="prepare worker processes")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="poise_prepare_speed_"))
    try:
        for dataset in ("cremad", "kinetics_sounds") if args.dataset == "both" else (args.dataset,):
            measure(dataset, args.clips, args.image_size, args.workers, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
