"""The audio-visual datasets of the seed papers, read in the layouts their released code uses.

Every audio-visual root holds the split files, a frame folder per clip (``<visual_dir>/<clip>/``,
jpg frames, sorted by name) and the audio either raw (``<audio_dir>/<clip>.wav``, decoded and
preprocessed at every read) or prepared by ``poise prepare`` (``<cache>/<clip>.npy``, preferred
when present). ``poise prepare`` writes the whole layout from the videos.

Validation: the official split where the dataset has one (AVE), otherwise a stratified share
``data.val_fraction`` of the training clips, fixed by ``data.split_seed``; never the test clips.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from poise.data.base import DataSplits
from poise.data.frames import FrameChoice
from poise.data.lazy import AudioReader, FlowReader, FrameReader, assemble_splits, resolve_problems
from poise.data.splitlists import list_path
from poise.data.media import AudioFeatures, ClipSpectrogram, CroppedSpectrogram, ImageTransform, NormalisedFbank, list_images
from poise.errors import DataError

CREMAD_CLASSES = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")


@dataclass(frozen=True)
class ClipRow:
    clip: str
    label: int
    split: str
    origin: str  # "<file> line <n>", for error messages


class MediaOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image_size: int = Field(224, ge=8, description="frames are resized / cropped to image_size x image_size")
    on_missing: Literal["error", "skip"] = Field(
        "error", description="a listed clip whose files are missing or too short: stop (error) or leave it out and list it (skip)"
    )


class AudioVisualOptions(MediaOptions):
    audio_dir: str = Field("audio", description="raw audio folder (<clip>.wav), read when no prepared cache exists")
    visual_dir: str = Field("visual", description="frame folder (<clip>/<frame>.jpg)")
    frames: int = Field(3, ge=1, description="frames per clip")
    frame_sampling: FrameChoice = Field(
        "segments", description="which frames (poise.data.frames): first, segments (random in training, middles at test), "
        "segment_starts (OGM-GE), segments_then_starts (BalanceBenchmark)"
    )


def read_rows(path: Path, what: str, separator: str | None = None) -> list[tuple[int, list[str]]]:
    """(line number, fields) of a split file, blank lines skipped. Fields: split at ``separator``
    when given, else csv when the line has commas, else whitespace-separated."""
    if not path.is_file():
        raise DataError(f"{what} '{path}' does not exist")
    out = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if separator is not None:
                fields = line.rstrip("\r\n").split(separator)
            else:
                fields = next(csv.reader([line])) if "," in line else line.split()
            out.append((number, [x.strip() for x in fields]))
    return out


def class_index(label: str, classes: Sequence[str], origin: str) -> int:
    """The index of a label given as a class name or as an integer index."""
    if label in classes:
        return list(classes).index(label)
    if re.fullmatch(r"\d+", label) and int(label) < len(classes):
        return int(label)
    shown = ", ".join(classes) if len(classes) <= 12 else f"{len(classes)} classes ({', '.join(classes[:5])}, ...)"
    raise DataError(f"{origin}: label '{label}' is not in the class list ({shown})")


def audio_visual_splits(name: str, root: Path, rows: list[ClipRow], classes: Sequence[str], options: AudioVisualOptions,
                        features: AudioFeatures, val_fraction: float, split_seed: int) -> DataSplits:
    """Check every listed clip's files, then the lazy splits (audio, visual)."""
    problems, kept, audio_paths, folders = [], [], [], []
    for row in rows:
        cache = root / features.cache_dir / f"{row.clip}.npy"
        raw = root / options.audio_dir / f"{row.clip}.wav"
        folder = root / options.visual_dir / row.clip
        audio = cache if cache.is_file() else raw if raw.is_file() else None
        reason = frames_problem(folder, options.frames)
        if audio is None:
            reason = f"neither the prepared audio '{cache}' nor the audio file '{raw}' exists"
        if reason:
            problems.append(f"{row.origin} (clip '{row.clip}'): {reason}")
            continue
        kept.append(row)
        audio_paths.append(audio)
        folders.append(folder)
    skipped = resolve_problems(name, problems, options.on_missing)
    transform = ImageTransform(options.image_size, "random_resized_crop")
    readers = {
        "audio": AudioReader(audio_paths, features),
        "visual": FrameReader(folders, options.frames, options.frame_sampling, transform),
    }
    return assemble_splits(name, readers, np.array([r.label for r in kept]), [f"{r.origin} (clip '{r.clip}')" for r in kept],
                           _parts(kept), classes, val_fraction, split_seed, skipped)


def frames_problem(folder: Path, needed: int) -> str | None:
    if not folder.is_dir():
        return f"frame folder '{folder}' does not exist"
    count = len(list_images(folder))
    if count < needed:
        return f"frame folder '{folder}' has {count} frames, {needed} needed"
    return None


def _parts(rows: Sequence[ClipRow]) -> dict[str, np.ndarray]:
    splits = np.array([r.split for r in rows])
    return {s: np.flatnonzero(splits == s) for s in ("train", "val", "test")}


def dataset_folder(arg: str | None, name: str) -> Path:
    if not arg:
        raise DataError(f"the {name} dataset needs its folder: --dataset {name}:DIR")
    root = Path(arg)
    if not root.is_dir():
        raise DataError(f"{name} folder '{root}' does not exist")
    return root


# ---- CREMA-D ----------------------------------------------------------------------------------------
class CremadOptions(AudioVisualOptions):
    train_csv: str = Field("train.csv", description="official training list, rows 'clip,LABEL'")
    test_csv: str = Field("test.csv", description="official test list, rows 'clip,LABEL'")
    audio_dir: str = Field("AudioWAV", description="raw audio folder (<clip>.wav), read when no prepared cache exists")
    visual_dir: str = Field("Image-01-FPS", description="frames at 1 fps (<clip>/NNNNN.jpg)")
    frames: int = Field(1, ge=1, description="frames per clip (OGM-GE: 1)")
    frame_sampling: FrameChoice = Field("first", description="first: the first frames of the sorted list (OGM-GE); "
                                         "segments_then_starts with frames 2: BalanceBenchmark")


def cremad_rows(root: Path, options: CremadOptions) -> tuple[list[ClipRow], list[str]]:
    rows = []
    for split, file in (("train", options.train_csv), ("test", options.test_csv)):
        what = f"CREMA-D {split} list"
        for number, fields in read_rows(list_path(root, "cremad", file, what), what):
            origin = f"{file} line {number}"
            if len(fields) < 2:
                raise DataError(f"{origin}: expected 'clip,LABEL', got '{','.join(fields)}'")
            rows.append(ClipRow(fields[0], class_index(fields[1], CREMAD_CLASSES, origin), split, origin))
    return rows, list(CREMAD_CLASSES)


# ---- Kinetics-Sounds --------------------------------------------------------------------------------
class KineticsSoundsOptions(AudioVisualOptions):
    train_list: str = Field("my_train.txt", description="training list, rows 'clip,...,LABEL' (label: index or name)")
    test_list: str = Field("my_test.txt", description="test list, same format")
    classes_file: str = Field("class.txt", description="class names, comma- or line-separated (optional with integer labels)")


def read_class_file(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8-sig")
    names = [c.strip() for c in re.split(r"[,\n]", text) if c.strip()]
    if not names:
        raise DataError(f"class file '{path}' lists no class")
    return names


def listed_rows(root: Path, files: dict[str, str], parse: Callable[[list[str]], tuple[str, str] | None], what: str,
                classes: list[str] | None, separator: str | None = None,
                dataset: str | None = None) -> tuple[list[ClipRow], list[str]]:
    """Rows of several split files whose lines ``parse`` turns into (clip, label) (None: a header).
    Without a class list: integer labels 0..max, or the sorted label names. ``dataset``: a list
    missing from ``root`` is read from poise's shipped copy."""
    raw = []
    for split, file in files.items():
        name = f"{what} {split} list"
        path = list_path(root, dataset, file, name) if dataset else root / file
        for number, fields in read_rows(path, name, separator):
            origin = f"{file} line {number}"
            try:
                parsed = parse(fields)
            except (IndexError, ValueError):
                raise DataError(f"{origin}: cannot read a clip and a label from '{' '.join(fields)}'") from None
            if parsed is not None:
                raw.append((*parsed, split, origin))
    if classes is None:
        labels = {r[1] for r in raw}
        if all(re.fullmatch(r"\d+", x) for x in labels):
            classes = [str(i) for i in range(max(int(x) for x in labels) + 1)] if labels else []
        else:
            classes = sorted(labels)
    return [ClipRow(c, class_index(lab, classes, o), s, o) for c, lab, s, o in raw], classes


def kinetics_sounds_rows(root: Path, options: KineticsSoundsOptions) -> tuple[list[ClipRow], list[str]]:
    """poise's shipped class file (OGM-GE's 31 classes) names the classes of poise's shipped lists only:
    lists of a user's own without a class file keep integer labels."""
    lists = (options.train_list, options.test_list)
    class_file = list_path(root, "kinetics_sounds", options.classes_file, described=lists)
    return listed_rows(root, dict(zip(("train", "test"), lists)), lambda f: (f[0], f[-1]),
                       "Kinetics-Sounds", read_class_file(class_file), dataset="kinetics_sounds")


# ---- AVE --------------------------------------------------------------------------------------------
class AveOptions(AudioVisualOptions):
    train_list: str = Field("trainSet.txt", description="rows 'Category&VideoID&Quality&Start&End'")
    test_list: str = Field("testSet.txt", description="same format")
    val_list: str | None = Field("valSet.txt", description="official validation list (none: carve from train)")
    annotations: str = Field("Annotations.txt", description="all clips; its categories (sorted) are the class list")


def _ave_fields(fields: list[str]) -> tuple[str, str] | None:
    """(video id, category) of a line 'Category&VideoID&Quality&Start&End'; None for the header."""
    if len(fields) < 2:
        raise ValueError("not an AVE line")
    return None if fields[1] == "VideoID" else (fields[1], fields[0])


def _ave_files(root: Path, options: AveOptions) -> dict[str, str]:
    files = {"train": options.train_list, "test": options.test_list}
    if options.val_list and list_path(root, "ave", options.val_list).is_file():
        files["val"] = options.val_list
    return files


def ave_rows(root: Path, options: AveOptions) -> tuple[list[ClipRow], list[str]]:
    """The rows of AVE's lists. A video id listed twice in one list (AVE lists 45 ids twice with
    different categories) is kept once, with its last line, as the released loader keeps it."""
    classes = None
    annotations = list_path(root, "ave", options.annotations)
    if annotations.is_file():
        lines = read_rows(annotations, "AVE annotations", separator="&")
        classes = sorted({f[0] for _, f in lines if len(f) > 1 and f[1] != "VideoID"})
    rows, classes = listed_rows(root, _ave_files(root, options), _ave_fields, "AVE", classes, separator="&", dataset="ave")
    last = {(r.split, r.clip): r for r in rows}
    return [r for r in rows if last[(r.split, r.clip)] is r], classes


def ave_duplicates(root: Path, options: AveOptions) -> list[str]:
    """One sentence per video id that AVE's lists give twice: within one list (the last line is
    kept) and across lists (the clip stays in each, as released)."""
    rows, classes = listed_rows(root, _ave_files(root, options), _ave_fields, "AVE", None, separator="&", dataset="ave")
    by_clip: dict[str, list[ClipRow]] = {}
    for r in rows:
        by_clip.setdefault(r.clip, []).append(r)
    out = []
    for clip, listed in by_clip.items():
        if len(listed) < 2:
            continue
        where = "; ".join(f"{r.origin} ({classes[r.label]})" for r in listed)
        splits = sorted({r.split for r in listed}, key=("train", "val", "test").index)
        kept = "; the last line of each list is kept" if len(splits) < len(listed) else ""
        both = f"; it is in {' and '.join(splits)}" if len(splits) > 1 else ""
        out.append(f"AVE video '{clip}' is listed {len(listed)} times: {where}{kept}{both}")
    return out


# ---- VGGSound ---------------------------------------------------------------------------------------
class VggSoundOptions(AudioVisualOptions):
    csv: str = Field("vggsound.csv", description="rows 'youtube_id,start_seconds,label,split' (split: train or test)")


def vggsound_rows(root: Path, options: VggSoundOptions) -> tuple[list[ClipRow], list[str]]:
    raw = []
    for number, fields in read_rows(list_path(root, "vggsound", options.csv, "VGGSound list"), "VGGSound list"):
        origin = f"{options.csv} line {number}"
        if len(fields) < 4 or fields[3] not in ("train", "test"):
            raise DataError(f"{origin}: expected 'youtube_id,start_seconds,label,train|test', got '{','.join(fields)}'")
        raw.append((f"{fields[0]}_{fields[1]}", fields[2], fields[3], origin))
    classes = sorted({r[1] for r in raw})
    return [ClipRow(c, classes.index(lab), s, o) for c, lab, s, o in raw], classes


@dataclass(frozen=True)
class AudioVisualSet:
    """One audio-visual dataset: how its split lists are read and its audio preprocessing (shared
    by the loader and by ``poise prepare``)."""

    name: str
    rows: Callable[[Path, AudioVisualOptions], tuple[list[ClipRow], list[str]]]
    features: AudioFeatures
    duplicates: Callable[[Path, AudioVisualOptions], list[str]] | None = None  # clips listed twice, reported

    def build(self, arg: str | None, options: AudioVisualOptions, val_fraction: float, split_seed: int) -> DataSplits:
        root = dataset_folder(arg, self.name)
        rows, classes = self.rows(root, options)
        splits = audio_visual_splits(self.name, root, rows, classes, options, self.features, val_fraction, split_seed)
        if self.duplicates is not None and (found := self.duplicates(root, options)):
            splits.notes["duplicates"] = found
        return splits


AUDIO_VISUAL_SETS = {
    s.name: s for s in (
        AudioVisualSet("cremad", cremad_rows, ClipSpectrogram()),
        AudioVisualSet("kinetics_sounds", kinetics_sounds_rows, NormalisedFbank()),
        AudioVisualSet("ave", ave_rows, NormalisedFbank(mono=True), ave_duplicates),  # the released AVE wavs: ffmpeg -ac 1
        AudioVisualSet("vggsound", vggsound_rows, CroppedSpectrogram()),
    )
}
build_cremad = AUDIO_VISUAL_SETS["cremad"].build
build_kinetics_sounds = AUDIO_VISUAL_SETS["kinetics_sounds"].build
build_ave = AUDIO_VISUAL_SETS["ave"].build
build_vggsound = AUDIO_VISUAL_SETS["vggsound"].build


# ---- UCF-101 ----------------------------------------------------------------------------------------
class Ucf101Options(MediaOptions):
    lists_dir: str = Field("ucfTrainTestlist", description="classInd.txt, trainlistNN.txt, testlistNN.txt")
    split: int = Field(1, ge=1, le=3, description="official split number")
    rgb_dir: str = Field("frames", description="RGB frames (<video>/<frame>.jpg)")
    flow_u_dir: str = Field("flow/u", description="horizontal flow frames (<video>/<frame>.jpg), greyscale")
    flow_v_dir: str = Field("flow/v", description="vertical flow frames, the same names as u")
    frames: int = Field(3, ge=1, description="RGB frames and flow frames per video")
    frame_sampling: FrameChoice = Field(
        "segments", description="which frames (poise.data.frames); BalanceBenchmark: segments_then_starts in a window of 6"
    )
    frame_window: int | None = Field(
        None, ge=1, description="only the first N RGB frame files take part (none: every frame; BalanceBenchmark: 6)"
    )
    grouped_validation: bool = Field(
        True, description="carve the validation share by whole gXX groups (same actors and scene), as the official splits do"
    )
    flow_flip: Literal["joint", "independent"] = Field(
        "joint", description="joint: one flip for u and v with u negated (the mirrored video's flow); independent: "
        "u and v flipped each on its own, u not negated (BalanceBenchmark)"
    )


def ucf101_rows(root: Path, options: Ucf101Options) -> tuple[list[ClipRow], list[str]]:
    lists = root / options.lists_dir
    classes = []
    for number, fields in read_rows(lists / "classInd.txt", "UCF-101 class index"):
        if len(fields) != 2 or fields[0] != str(len(classes) + 1):
            raise DataError(f"classInd.txt line {number}: expected '{len(classes) + 1} ClassName', got '{' '.join(fields)}'")
        classes.append(fields[1])
    rows = []
    for split, file in (("train", f"trainlist{options.split:02d}.txt"), ("test", f"testlist{options.split:02d}.txt")):
        for number, fields in read_rows(lists / file, f"UCF-101 {split} list"):
            origin = f"{file} line {number}"
            class_name, _, video = fields[0].partition("/")
            rows.append(ClipRow(Path(video).stem, class_index(class_name, classes, origin), split, origin))
    return rows, classes


def build_ucf101(arg: str | None, options: Ucf101Options, val_fraction: float, split_seed: int) -> DataSplits:
    root = dataset_folder(arg, "ucf101")
    rows, classes = ucf101_rows(root, options)
    problems, kept = [], []
    for row in rows:
        reason = next((p for p in (frames_problem(root / d / row.clip, options.frames)
                                   for d in (options.rgb_dir, options.flow_u_dir, options.flow_v_dir)) if p), None)
        if reason:
            problems.append(f"{row.origin} (video '{row.clip}'): {reason}")
        else:
            kept.append(row)
    skipped = resolve_problems("ucf101", problems, options.on_missing)
    # released: Resize + flip for training (no random crop); RGB normalised, flow left in [0, 1]
    rgb = ImageTransform(options.image_size, "resize_flip")
    flow = ImageTransform(options.image_size, "resize_flip", mean=None, std=None)
    readers = {
        "visual": FrameReader([root / options.rgb_dir / r.clip for r in kept], options.frames, options.frame_sampling, rgb,
                              window=options.frame_window),
        "flow": FlowReader(FrameReader([root / options.flow_u_dir / r.clip for r in kept], options.frames,
                                       options.frame_sampling, flow, mode="L"),
                           [root / options.flow_v_dir / r.clip for r in kept], flip=options.flow_flip),
    }
    return assemble_splits("ucf101", readers, np.array([r.label for r in kept]), [f"{r.origin} (video '{r.clip}')" for r in kept],
                           _parts(kept), classes, val_fraction, split_seed, skipped,
                           groups=[ucf101_group(r.clip) for r in kept] if options.grouped_validation else None)


def ucf101_group(video: str) -> str:
    """The group of a UCF-101 video 'v_<Class>_gXX_cYY': gXX (the same actors and scene; the official
    splits hold out groups 1-7 / 8-14 / 15-21 of every class at once)."""
    match = re.search(r"_(g\d+)_c\d+$", video)
    if match is None:
        raise DataError(f"UCF-101 video name '{video}' has no group (expected v_<Class>_gXX_cYY)")
    return match.group(1)
