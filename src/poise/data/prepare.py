"""``poise prepare <dataset> --raw DIR --out DIR``: decode the videos and audio once into the cache
that the loaders read.

Audio-visual sets (cremad, kinetics_sounds, ave, vggsound): for every clip of the dataset's split
lists (copied from the raw folder, or where it has none, the official lists shipped with poise), frames at the dataset's rate (1 fps) from the video with PyAV,
written as ``<frames>/<clip>/NNNNN.jpg``, and the audio (the dataset's wav when the raw folder has
one, else the video's audio track) turned into the dataset's spectrogram / filter-bank with the
published parameters, ``<cache>/<clip>.npy``.

UCF-101 (``ucf101``): from ``UCF-101/<Class>/v_<Class>_gXX_cYY.avi`` and ``ucfTrainTestlist/``,
every frame of every video as ``frames/<video>/frame000001.jpg`` and the optical flow between
consecutive frames as two greyscale JPEGs, ``flow/u/<video>/frame000001.jpg`` (horizontal) and
``flow/v/...`` (vertical), quantised as the released TV-L1 flow frames are (clipped to +-20 px,
mapped onto 0..255, zero motion mid-grey). The flow is OpenCV's Dual TV-L1 (the released
algorithm; needs ``opencv-contrib-python-headless``, in the media extra) or, when the contrib
modules are missing or ``flow="farneback"`` (``--flow farneback``) is asked for, OpenCV's Farneback
flow: about 30x faster on a CPU, but not the published flow. TV-L1 takes about 0.9 s per 320 x 240
frame pair on one CPU core, some 600 core-hours for UCF-101's 2.5 million frames (Farneback: 26 ms,
about 18 core-hours). Which flow was used is written to ``prepared.json``.

Food-101 and MVSA-Single (``food101``, ``mvsa``): every listed image with its shorter side brought
down to 256 px (aspect kept, never enlarged), under the same name, and the lists and texts copied,
so that the loaders decode a small jpg instead of the original every epoch.

Items run in parallel worker processes. Every write is atomic (a temporary name, then
``os.replace``), so an interrupted run leaves no half-written clip and a second run does only what
is missing. Inputs that cannot be read are skipped and listed in ``prepare_report.txt``
(and counted on the terminal); the clips listed there are the ones the loaders will refuse
(``dataset.on_missing: skip`` leaves them out).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from poise.data.audiovisual import (
    AUDIO_VISUAL_SETS,
    AudioVisualOptions,
    AveOptions,
    CremadOptions,
    KineticsSoundsOptions,
    Ucf101Options,
    VggSoundOptions,
    ucf101_rows,
)
from poise.data.media import FLOW_BOUND, FLOW_METHODS, AudioFeatures, video_frames
from poise.data.splitlists import shipped_list
from poise.errors import DataError

VIDEO_SUFFIXES = {".mp4", ".flv", ".avi", ".mkv", ".webm", ".mov"}
REPORT = "prepare_report.txt"
MANIFEST = "prepared.json"
JPEG_QUALITY = 95


class Job(Protocol):
    """One item to prepare in a worker process: ``run`` writes its outputs atomically and raises
    on an input that cannot be read."""

    clip: str
    origin: str

    def run(self) -> None: ...


class Target(Protocol):
    """How one dataset is prepared."""

    def plan(self, raw: Path, out: Path, settings: dict[str, Any]) -> tuple[list[Job], int]: ...
    def outputs(self) -> list[str]: ...  # output folders (leftovers of an interrupted run are removed)
    def lists(self) -> tuple[str, ...]: ...  # split files (or folders) copied from raw to out
    def describe(self, settings: dict[str, Any]) -> dict[str, Any]: ...  # for prepared.json


# ---- audio-visual sets ----------------------------------------------------------------------------
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

    def run(self) -> None:
        if self.audio_out is not None:
            source = self.audio or self.video
            if source is None:
                raise DataError("no audio file and no video to read the audio track from")
            save_array(self.features.cache_array(self.features.read(source)), self.audio_out)
        if self.frames_out is not None:
            if self.video is None:
                raise DataError("no video file to take frames from")
            frames = video_frames(self.video, self.fps)
            if not frames:
                raise DataError(f"video file '{self.video}' has no decodable frame")
            with _atomic_folder(self.frames_out) as tmp:
                for k, image in enumerate(frames, start=1):
                    image.convert("RGB").save(tmp / f"{k:05d}.jpg", quality=JPEG_QUALITY)


@dataclass(frozen=True)
class PrepareTarget:
    """An audio-visual set: its loader's default options (split lists, which are copied to the
    output, and folders) and the raw video folder. Raw media: ``<audio_dir>/<clip>.wav`` when
    present, videos found by file name (without suffix) anywhere under ``video_dir``."""

    name: str
    options: AudioVisualOptions
    list_files: tuple[str, ...]
    video_dir: str
    fps: float = 1.0

    @property
    def features(self) -> AudioFeatures:
        return AUDIO_VISUAL_SETS[self.name].features

    def plan(self, raw, out, settings):
        rows, _ = AUDIO_VISUAL_SETS[self.name].rows(raw, self.options)
        videos = _media_index(raw / self.video_dir)
        jobs, done = [], 0
        for row in dict((r.clip, r) for r in rows).values():
            audio_out = out / self.features.cache_dir / f"{row.clip}.npy"
            frames_out = out / self.options.visual_dir / row.clip
            wav = raw / self.options.audio_dir / f"{row.clip}.wav"
            job = ClipJob(row.clip, row.origin, videos.get(row.clip), wav if wav.is_file() else None,
                          None if audio_out.is_file() else audio_out, None if frames_out.is_dir() else frames_out,
                          self.features, self.fps)
            if job.audio_out is None and job.frames_out is None:
                done += 1
            else:
                jobs.append(job)
        return jobs, done

    def outputs(self):
        return [self.features.cache_dir, self.options.visual_dir]

    def duplicates(self, raw: Path) -> list[str]:
        """Clips that the split lists give twice (AVE), reported by ``poise prepare``."""
        report = AUDIO_VISUAL_SETS[self.name].duplicates
        return report(raw, self.options) if report is not None else []

    def lists(self):
        return self.list_files

    def describe(self, settings):
        features = self.features
        return {"audio": {"kind": type(features).__name__, **asdict(features)},
                "frames": {"folder": self.options.visual_dir, "fps": self.fps}}


# ---- UCF-101: RGB frames and optical flow ----------------------------------------------------------
@dataclass(frozen=True)
class VideoFlowJob:
    """Every frame of one video (RGB jpgs) and the flow between consecutive frames (u, v jpgs)."""

    clip: str
    origin: str
    video: Path | None
    frames_out: Path | None  # None: already prepared
    flow_out: tuple[Path, Path] | None  # (u folder, v folder); None: already prepared
    flow: str
    bound: float = FLOW_BOUND

    def run(self) -> None:
        if self.video is None:
            raise DataError("no video file")
        from PIL import Image

        from poise.data.media import flow_estimator, iter_video_frames, quantise_flow

        estimate = flow_estimator(self.flow) if self.flow_out is not None else None
        with _atomic_folder(self.frames_out) as rgb, _atomic_folder(self.flow_out and self.flow_out[0]) as u, \
                _atomic_folder(self.flow_out and self.flow_out[1]) as v:
            previous, count = None, 0
            for frame in iter_video_frames(self.video):
                count += 1
                name = f"frame{count:06d}.jpg"
                if rgb is not None:
                    frame.to_image().save(rgb / name, quality=JPEG_QUALITY)
                if estimate is None:
                    continue
                grey = frame.to_ndarray(format="gray")
                if previous is not None:
                    flow = quantise_flow(estimate(previous, grey), self.bound)
                    flow_name = f"frame{count - 1:06d}.jpg"
                    Image.fromarray(np.ascontiguousarray(flow[:, :, 0])).save(u / flow_name, quality=JPEG_QUALITY)
                    Image.fromarray(np.ascontiguousarray(flow[:, :, 1])).save(v / flow_name, quality=JPEG_QUALITY)
                previous = grey
            if count == 0:
                raise DataError(f"video file '{self.video}' has no decodable frame")
            if estimate is not None and count < 2:
                raise DataError(f"video file '{self.video}' has a single frame: no optical flow")


@dataclass(frozen=True)
class Ucf101Target:
    """UCF-101: the videos under ``UCF-101/`` (found by name at any depth), the lists in
    ``ucfTrainTestlist/`` (every official split that is there)."""

    name: str = "ucf101"
    options: Ucf101Options = field(default_factory=Ucf101Options)
    video_dir: str = "UCF-101"

    def plan(self, raw, out, settings):
        rows = {}
        for split in (1, 2, 3):
            options = self.options.model_copy(update={"split": split})
            if split == 1 or (raw / options.lists_dir / f"trainlist{split:02d}.txt").is_file():
                for row in ucf101_rows(raw, options)[0]:
                    rows.setdefault(row.clip, row)
        videos = _media_index(raw / self.video_dir)
        jobs, done = [], 0
        for row in rows.values():
            frames_out = out / self.options.rgb_dir / row.clip
            u, v = out / self.options.flow_u_dir / row.clip, out / self.options.flow_v_dir / row.clip
            job = VideoFlowJob(row.clip, row.origin, videos.get(row.clip), None if frames_out.is_dir() else frames_out,
                               None if u.is_dir() and v.is_dir() else (u, v), settings["flow"])
            if job.frames_out is None and job.flow_out is None:
                done += 1
            else:
                jobs.append(job)
        return jobs, done

    def outputs(self):
        return [self.options.rgb_dir, self.options.flow_u_dir, self.options.flow_v_dir]

    def lists(self):
        return (self.options.lists_dir,)

    def describe(self, settings):
        return {"frames": {"folder": self.options.rgb_dir, "fps": "every frame"},
                "flow": {"method": settings["flow"], "bound": FLOW_BOUND, "u": self.options.flow_u_dir,
                         "v": self.options.flow_v_dir, "stored": "round((flow + bound) * 255 / (2 bound)), clipped to 0..255"}}


# ---- image + text: Food-101 and MVSA ---------------------------------------------------------------
IMAGE_SIDE = 256


@dataclass(frozen=True)
class ImageJob:
    """One image made smaller (shorter side ``side``, aspect kept, never enlarged), saved under the
    same name; the files of ``copies`` (a post's text) copied beside it."""

    clip: str
    origin: str
    source: Path
    image_out: Path
    side: int
    copies: tuple[tuple[Path, Path], ...] = ()

    def run(self) -> None:
        from PIL import Image

        from poise.data.media import read_image

        for source, target in self.copies:
            if not source.is_file():
                raise DataError(f"file '{source}' does not exist")
        image = read_image(self.source)  # RGB, as the loader reads it
        scale = self.side / min(image.size)
        if scale < 1:  # the loader's (antialiased) bilinear filter
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.BILINEAR)
        self.image_out.parent.mkdir(parents=True, exist_ok=True)
        for source, target in self.copies:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = _temporary(target)
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)
        tmp = _temporary(self.image_out)
        image.save(tmp, format=Image.registered_extensions().get(self.image_out.suffix.lower(), "JPEG"), quality=JPEG_QUALITY)
        os.replace(tmp, self.image_out)  # last: an image in place means the item is done


@dataclass(frozen=True)
class ImageTextTarget:
    """Food-101 (``images/<split>/<label>/<image>``, lists in ``texts/``) or MVSA-Single
    (``data/<ID>.jpg`` and ``data/<ID>.txt``, ``labelResultAll.txt``): every listed image with its
    shorter side brought down to ``IMAGE_SIDE`` pixels (256, above the loaders' 224), the texts and
    lists copied as they are (they are tokenised when the dataset is built, which is cheap). The
    geometry of every augmentation is unchanged (crops and rotations are drawn in fractions of the
    image); what changes is that the loader decodes a small jpg instead of the original."""

    name: str

    @property
    def leftovers(self) -> str:
        """Where an interrupted run leaves temporary files, under each output folder."""
        return "*/*/.*.tmp*" if self.name == "food101" else ".*.tmp*"

    def items(self, raw: Path, out: Path) -> list[tuple[str, str, Path, Path, tuple[tuple[Path, Path], ...]]]:
        from poise.data.imagetext import Food101Options, MvsaOptions, food101_rows, mvsa_rows

        if self.name == "food101":
            options = Food101Options()
            return [(f"{split}/{label}/{image}", origin, raw / options.images_dir / split / label / image,
                     out / options.images_dir / split / label / image, ())
                    for image, _, label, split, origin in food101_rows(raw, options)]
        options = MvsaOptions()
        data_in, data_out = raw / options.data_dir, out / options.data_dir
        return [(post, origin, data_in / f"{post}.jpg", data_out / f"{post}.jpg",
                 ((data_in / f"{post}.txt", data_out / f"{post}.txt"),))
                for post, _, _, origin in mvsa_rows(raw, options)]

    def plan(self, raw, out, settings):
        jobs, done = [], 0
        for clip, origin, source, image_out, copies in dict((i[0], i) for i in self.items(raw, out)).values():
            if image_out.is_file() and all(t.is_file() for _, t in copies):
                done += 1
            else:
                jobs.append(ImageJob(clip, origin, source, image_out, IMAGE_SIDE, copies))
        return jobs, done

    def outputs(self):
        return ["images"] if self.name == "food101" else ["data"]

    def lists(self):
        return ("texts",) if self.name == "food101" else ("labelResultAll.txt", "train.jsonl", "dev.jsonl", "test.jsonl")

    def describe(self, settings):
        return {"images": {"shorter_side": IMAGE_SIDE, "filter": "bilinear", "jpeg_quality": JPEG_QUALITY},
                "texts": "copied; tokenised when the dataset is built"}


TARGETS: dict[str, Target] = {
    "cremad": PrepareTarget("cremad", CremadOptions(), ("train.csv", "test.csv"), "VideoFlash"),  # lists: raw, else shipped
    "kinetics_sounds": PrepareTarget("kinetics_sounds", KineticsSoundsOptions(), ("my_train.txt", "my_test.txt", "class.txt"),
                                     "videos"),
    "ave": PrepareTarget("ave", AveOptions(), ("trainSet.txt", "testSet.txt", "valSet.txt", "Annotations.txt"), "AVE"),
    "vggsound": PrepareTarget("vggsound", VggSoundOptions(), ("vggsound.csv",), "videos"),
    "ucf101": Ucf101Target(),
    "food101": ImageTextTarget("food101"),
    "mvsa": ImageTextTarget("mvsa"),
}


# ---- the common machinery ---------------------------------------------------------------------------
def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def save_array(array: np.ndarray, path: Path) -> None:
    tmp = _temporary(path)
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


class _atomic_folder:
    """A temporary folder beside ``path`` that becomes ``path`` (replacing a stale one) only when
    the block ends without an error; ``path`` None: a no-op that gives None."""

    def __init__(self, path: Path | None):
        self.path = path
        self.tmp = None if path is None else _temporary(path)

    def __enter__(self) -> Path | None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, kind, error, trace) -> None:
        if self.tmp is None:
            return
        if kind is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.path.is_dir():  # half of a pair (flow u without v) from an interrupted run
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)


def prepare_clip(job: Job) -> tuple[str, str, str | None]:
    """(clip, origin, None) when done, (clip, origin, reason) when an input cannot be read."""
    try:
        job.run()
    except DataError as e:
        return job.clip, job.origin, str(e)
    except Exception as e:  # a decoder failing in an unforeseen way must not stop the other clips
        return job.clip, job.origin, f"{type(e).__name__}: {e}"
    return job.clip, job.origin, None


def _single_threaded_worker(opencv: bool = False) -> None:
    """Parallelism is across clips. A forked child that enters an OpenMP region its parent already
    used can hang (GNU OpenMP), so torch (and OpenCV, for the flow) run serially in the workers."""
    import torch

    torch.set_num_threads(1)
    if opencv:
        import cv2

        cv2.setNumThreads(1)


def _media_index(folder: Path) -> dict[str, Path]:
    """Video files under ``folder`` (any depth) by file name without suffix."""
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.rglob("*")) if p.suffix.lower() in VIDEO_SUFFIXES}


def _settings(dataset: str, flow: str | None) -> dict[str, Any]:
    if dataset != "ucf101":
        if flow is not None:
            raise DataError(f"--flow applies to ucf101 only, not to {dataset}")
        return {}
    from poise.data.media import default_flow_method

    if flow is not None and flow not in FLOW_METHODS:
        raise DataError(f"optical flow method '{flow}' is not one of {', '.join(FLOW_METHODS)}")
    return {"flow": flow or default_flow_method()}


def plan(dataset: str, raw: Path, out: Path, flow: str | None = None) -> tuple[list[Job], int]:
    """The jobs still to do, and how many clips are already prepared."""
    if dataset not in TARGETS:
        raise DataError(f"poise prepare knows {', '.join(TARGETS)}; '{dataset}' is read as it is")
    if not raw.is_dir():
        raise DataError(f"raw folder '{raw}' does not exist")
    return TARGETS[dataset].plan(raw, out, _settings(dataset, flow))


def run_prepare(dataset: str, raw: Path, out: Path, workers: int = 1, progress: bool = True,
                flow: str | None = None) -> dict:
    """Prepare every missing clip; returns a summary and writes ``prepared.json`` and the report.
    ``flow`` (ucf101 only): ``tvl1`` or ``farneback``; default TV-L1 when OpenCV has it."""
    from tqdm import tqdm

    jobs, done = plan(dataset, raw, out, flow)
    target, settings = TARGETS[dataset], _settings(dataset, flow)
    for sub in target.outputs():
        (out / sub).mkdir(parents=True, exist_ok=True)
        for leftover in (out / sub).glob(getattr(target, "leftovers", ".*.tmp*")):  # from an interrupted run
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
    lists = {}
    for name in target.lists():
        if (raw / name).is_file():
            shutil.copyfile(raw / name, out / name)
            lists[name] = "raw folder"
        elif (raw / name).is_dir():
            shutil.copytree(raw / name, out / name, dirs_exist_ok=True)
            lists[name] = "raw folder"
        elif (shipped := shipped_list(dataset, name, raw)) is not None:  # the raw distribution has no list: poise's copy
            shutil.copyfile(shipped, out / name)
            lists[name] = "shipped with poise"
    failures: list[tuple[str, str, str]] = []
    bar = tqdm(total=len(jobs), desc=f"prepare {dataset}", unit="clip", disable=not progress)
    if workers <= 1:
        results = map(prepare_clip, jobs)
        for clip, origin, reason in results:
            if reason:
                failures.append((clip, origin, reason))
            bar.update()
    else:
        # OpenCV's thread pool does not survive a fork (a forked worker can hang in it): fresh
        # interpreters for the flow
        context = multiprocessing.get_context("spawn") if "flow" in settings else None
        with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_single_threaded_worker,
                                 initargs=("flow" in settings,)) as pool:
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
               "lists": lists, **target.describe(settings)}
    duplicates = getattr(target, "duplicates", lambda raw: [])(raw)
    if duplicates:
        summary["listed_twice"] = duplicates
    _write_text(out / MANIFEST, json.dumps(summary, indent=1))
    return summary


def _write_text(path: Path, text: str) -> None:
    tmp = _temporary(path)
    tmp.write_text(text)
    os.replace(tmp, path)
