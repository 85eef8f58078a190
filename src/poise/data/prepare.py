"""``poise prepare <dataset> --raw DIR --out DIR``: decode the videos and audio once into the cache
that the loaders read.

For every clip of the dataset's split lists (copied from the raw folder): frames at the dataset's
rate (1 fps) from the video with PyAV, written as ``<frames>/<clip>/NNNNN.jpg``, and the audio
(the dataset's wav when the raw folder has one, else the video's audio track) turned into the
dataset's spectrogram / filter-bank with the published parameters, ``<cache>/<clip>.npy``.

Clips run in parallel worker processes. Every write is atomic (a temporary name, then
``os.replace``), so an interrupted run leaves no half-written clip and a second run does only what
is missing. Inputs that cannot be read are skipped and listed in ``prepare_report.txt``
(and counted on the terminal); the clips listed there are the ones the loaders will refuse
(``dataset.on_missing: skip`` leaves them out).
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from poise.data.audiovisual import (
    AUDIO_VISUAL_SETS,
    AudioVisualOptions,
    AveOptions,
    CremadOptions,
    KineticsSoundsOptions,
    VggSoundOptions,
)
from poise.data.media import AudioFeatures, video_frames
from poise.errors import DataError

VIDEO_SUFFIXES = {".mp4", ".flv", ".avi", ".mkv", ".webm", ".mov"}
REPORT = "prepare_report.txt"
MANIFEST = "prepared.json"
JPEG_QUALITY = 95


@dataclass(frozen=True)
class PrepareTarget:
    """How one dataset is prepared: its loader's default options (split lists, which are copied to
    the output, and folders) and the raw video folder. Raw media: ``<audio_dir>/<clip>.wav`` when
    present, videos found by file name (without suffix) anywhere under ``video_dir``."""

    options: AudioVisualOptions
    lists: tuple[str, ...]
    video_dir: str
    fps: float = 1.0


TARGETS: dict[str, PrepareTarget] = {
    "cremad": PrepareTarget(CremadOptions(), ("train.csv", "test.csv"), "VideoFlash"),
    "kinetics_sounds": PrepareTarget(KineticsSoundsOptions(), ("my_train.txt", "my_test.txt", "class.txt"), "videos"),
    "ave": PrepareTarget(AveOptions(), ("trainSet.txt", "testSet.txt", "valSet.txt", "Annotations.txt"), "AVE"),
    "vggsound": PrepareTarget(VggSoundOptions(), ("vggsound.csv",), "videos"),
}


@dataclass(frozen=True)
class ClipJob:
    clip: str
    origin: str
    video: Path | None
    audio: Path | None
    audio_out: Path | None  # None: already prepared
    frames_out: Path | None
    features: AudioFeatures
    fps: float


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def save_array(array: np.ndarray, path: Path) -> None:
    tmp = _temporary(path)
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def prepare_clip(job: ClipJob) -> tuple[str, str, str | None]:
    """(clip, origin, None) when done, (clip, origin, reason) when an input cannot be read."""
    try:
        if job.audio_out is not None:
            source = job.audio or job.video
            if source is None:
                raise DataError("no audio file and no video to read the audio track from")
            from poise.data.media import read_audio

            save_array(job.features.cache_array(read_audio(source, job.features.sample_rate)), job.audio_out)
        if job.frames_out is not None:
            if job.video is None:
                raise DataError("no video file to take frames from")
            frames = video_frames(job.video, job.fps)
            if not frames:
                raise DataError(f"video file '{job.video}' has no decodable frame")
            tmp = _temporary(job.frames_out)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for k, image in enumerate(frames, start=1):
                image.convert("RGB").save(tmp / f"{k:05d}.jpg", quality=JPEG_QUALITY)
            os.replace(tmp, job.frames_out)
    except DataError as e:
        return job.clip, job.origin, str(e)
    except Exception as e:  # a decoder failing in an unforeseen way must not stop the other clips
        return job.clip, job.origin, f"{type(e).__name__}: {e}"
    return job.clip, job.origin, None


def _single_threaded_worker() -> None:
    """Parallelism is across clips. A forked child that enters an OpenMP region its parent already
    used can hang (GNU OpenMP), so torch runs serially in the workers."""
    import torch

    torch.set_num_threads(1)


def _media_index(folder: Path) -> dict[str, Path]:
    """Video files under ``folder`` (any depth) by file name without suffix."""
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.rglob("*")) if p.suffix.lower() in VIDEO_SUFFIXES}


def plan(dataset: str, raw: Path, out: Path) -> tuple[list[ClipJob], int]:
    """The jobs still to do, and how many clips are already prepared."""
    if dataset not in TARGETS:
        raise DataError(f"poise prepare knows {', '.join(TARGETS)}; '{dataset}' is read as it is")
    target, features = TARGETS[dataset], AUDIO_VISUAL_SETS[dataset].features
    if not raw.is_dir():
        raise DataError(f"raw folder '{raw}' does not exist")
    rows, _ = AUDIO_VISUAL_SETS[dataset].rows(raw, target.options)
    videos = _media_index(raw / target.video_dir)
    jobs, done = [], 0
    for row in dict((r.clip, r) for r in rows).values():
        audio_out = out / features.cache_dir / f"{row.clip}.npy"
        frames_out = out / target.options.visual_dir / row.clip
        wav = raw / target.options.audio_dir / f"{row.clip}.wav"
        job = ClipJob(row.clip, row.origin, videos.get(row.clip), wav if wav.is_file() else None,
                      None if audio_out.is_file() else audio_out, None if frames_out.is_dir() else frames_out,
                      features, target.fps)
        if job.audio_out is None and job.frames_out is None:
            done += 1
        else:
            jobs.append(job)
    return jobs, done


def run_prepare(dataset: str, raw: Path, out: Path, workers: int = 1, progress: bool = True) -> dict:
    """Prepare every missing clip; returns a summary and writes ``prepared.json`` and the report."""
    from tqdm import tqdm

    jobs, done = plan(dataset, raw, out)
    target, features = TARGETS[dataset], AUDIO_VISUAL_SETS[dataset].features
    for sub in (features.cache_dir, target.options.visual_dir):
        (out / sub).mkdir(parents=True, exist_ok=True)
        for leftover in (out / sub).glob(".*.tmp*"):  # from an interrupted run
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
    for name in target.lists:
        if (raw / name).is_file():
            shutil.copyfile(raw / name, out / name)
    failures: list[tuple[str, str, str]] = []
    bar = tqdm(total=len(jobs), desc=f"prepare {dataset}", unit="clip", disable=not progress)
    if workers <= 1:
        results = map(prepare_clip, jobs)
        for clip, origin, reason in results:
            if reason:
                failures.append((clip, origin, reason))
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers, initializer=_single_threaded_worker) as pool:
            for future in as_completed([pool.submit(prepare_clip, job) for job in jobs]):
                clip, origin, reason = future.result()
                if reason:
                    failures.append((clip, origin, reason))
                bar.update()
    bar.close()
    failures.sort()
    report = "".join(f"{clip}\t{origin}\t{reason}\n" for clip, origin, reason in failures)
    _write_text(out / REPORT, "clip\tlisted at\twhy it was skipped\n" + report)
    summary = {"dataset": dataset, "clips": len(jobs) + done, "already_prepared": done,
               "prepared": len(jobs) - len(failures), "skipped": len(failures), "report": str(out / REPORT),
               "audio": {"kind": type(features).__name__, **asdict(features)},
               "frames": {"folder": target.options.visual_dir, "fps": target.fps}}
    _write_text(out / MANIFEST, json.dumps(summary, indent=1))
    return summary


def _write_text(path: Path, text: str) -> None:
    tmp = _temporary(path)
    tmp.write_text(text)
    os.replace(tmp, path)
