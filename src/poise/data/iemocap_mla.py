"""IEMOCAP as MLA (CVPR 2024) uses it: raw IEMOCAP, four classes with happy merged with excited
(5,531 utterances), MLA's own lists, BERT token ids, one face frame and filter-bank audio. This is
not the MulT pickle (``iemocap:PATH``: about 4.4k utterances, happy without excited); the two
settings' numbers are not comparable.

``iemocap_mla:DIR`` reads the folder MLA's scripts prepare:

- ``my_train_iemo.txt`` / ``my_test_iemo.txt`` (and ``my_dev_iemo.txt`` when present: the validation
  split), lines ``<utterance>.mp4 [split|sign] <transcript> [split|sign] <Label>``;
- ``stat_iemo.txt``: the class names (sorted, as the released loader sorts them);
- ``visual/<split>_imgs/<utterance>/``: face frames, of which the middle one is read;
- ``audio/<split>_fbank/<utterance>.npy``: the filter-bank (T, F) of each utterance;
- ``text_token/<split>_token/<utterance>_token.npy``: BERT ids (1, 256) without special tokens; without
  that folder the transcripts are tokenised (``tokenizer: DIR`` as MLA: 256 ids, no special tokens).

Validation (no dev list): a share of the training utterances by whole sessions (``Ses01`` ..
``Ses05``), so that no speaker pair is on both sides.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from poise.data.audiovisual import dataset_folder
from poise.data.base import DataSplits, ModalitySpec
from poise.data.imagetext import TextOptions, image_transform, tokenize_texts
from poise.data.lazy import ArrayFileReader, ArrayReader, FrameReader, assemble_splits, resolve_problems
from poise.errors import DataError

SEPARATOR = " [split|sign] "


class IemocapMlaOptions(TextOptions):
    image_size: int = Field(256, ge=8, description="face frame size (MLA: 256)")
    augment: Literal["crop_jitter", "random_resized_crop", "resize_flip", "none"] = Field(
        "crop_jitter", description="training image augmentation (MLA: bicubic RandomResizedCrop 256 + flip + colour jitter)"
    )
    train_list: str = Field("my_train_iemo.txt", description="training list")
    dev_list: str = Field("my_dev_iemo.txt", description="validation list, used when present")
    test_list: str = Field("my_test_iemo.txt", description="test list")
    classes_file: str = Field("stat_iemo.txt", description="class names, one a line")
    grouped_validation: bool = Field(True, description="without a dev list: hold out whole sessions for validation")

    released_text: ClassVar[tuple[int, bool]] = (256, False)


def session(utterance: str) -> str:
    match = re.match(r"(Ses\d+)", utterance)
    if match is None:
        raise DataError(f"IEMOCAP utterance '{utterance}' does not start with its session (SesNN)")
    return match.group(1)


def _read_list(path: Path) -> list[tuple[str, str, str, str]]:
    """(utterance, transcript, label, origin) of every line."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(SEPARATOR)
        origin = f"{path.name} line {number}"
        if len(fields) < 2:
            raise DataError(f"{origin}: expected '<utterance>.mp4{SEPARATOR}<transcript>{SEPARATOR}<Label>', got '{line[:80]}'")
        utterance = Path(fields[0].strip()).stem
        rows.append((utterance, fields[1].strip() if len(fields) > 2 else "", fields[-1].strip(), origin))
    return rows


def build_iemocap_mla(arg: str | None, options: IemocapMlaOptions, val_fraction: float, split_seed: int) -> DataSplits:
    root = dataset_folder(arg, "iemocap_mla")
    files = {"train": options.train_list, "test": options.test_list}
    if (root / options.dev_list).is_file():
        files["val"] = options.dev_list
    listed = []
    for split, name in files.items():
        if not (root / name).is_file():
            raise DataError(f"IEMOCAP (MLA) {split} list '{root / name}' does not exist")
        listed += [(split, *row) for row in _read_list(root / name)]
    classes_path = root / options.classes_file
    if classes_path.is_file():
        classes = sorted(c.strip() for c in classes_path.read_text(encoding="utf-8-sig").splitlines() if c.strip())
    else:
        classes = sorted({row[3] for row in listed})
    token_dir = root / "text_token"
    problems, kept = [], []
    for split, utterance, text, label, origin in listed:
        if label not in classes:
            raise DataError(f"{origin}: label '{label}' is not in the class list ({', '.join(classes)})")
        folder = {"train": "train", "val": "dev", "test": "test"}[split]  # MLA's folder names
        paths = {
            "frames": root / "visual" / f"{folder}_imgs" / utterance,
            "audio": root / "audio" / f"{folder}_fbank" / f"{utterance}.npy",
        }
        if token_dir.is_dir():
            paths["tokens"] = token_dir / f"{folder}_token" / f"{utterance}_token.npy"
        lacking = next((p for k, p in paths.items() if not (p.is_dir() if k == "frames" else p.is_file())), None)
        if lacking is None and not any(paths["frames"].iterdir()):
            lacking = paths["frames"]
        if lacking is not None:
            problems.append(f"{origin} (utterance '{utterance}'): '{lacking}' does not exist or is empty")
            continue
        kept.append((split, utterance, text, classes.index(label), origin, paths))
    skipped = resolve_problems("iemocap_mla", problems, options.on_missing)
    if not kept:
        raise DataError(f"iemocap_mla: the lists in '{root}' name no usable utterance")
    splits = np.array([k[0] for k in kept])
    parts = {s: np.flatnonzero(splits == s) for s in ("train", "val", "test")}
    first_audio = np.load(kept[0][5]["audio"], allow_pickle=False)
    if first_audio.ndim != 2:
        raise DataError(f"'{kept[0][5]['audio']}' holds an array of shape {first_audio.shape}, expected (T, F)")
    if token_dir.is_dir():
        rows = [_token_row(k[5]["tokens"]) for k in kept]
        if len({len(r) for r in rows}) > 1:
            raise DataError(f"the token files under '{token_dir}' hold ids of different lengths ({sorted({len(r) for r in rows})})")
        ids = np.stack(rows)
        text_reader = ArrayReader(ids, ModalitySpec("tokens", (ids.shape[1],), int(ids.max()) + 1))
    else:
        ids, vocab = tokenize_texts([k[2] for k in kept], parts["train"], options)
        text_reader = ArrayReader(ids, ModalitySpec("tokens", (ids.shape[1],), vocab))
    readers = {
        "audio": ArrayFileReader([k[5]["audio"] for k in kept], first_audio.shape),
        "visual": FrameReader([k[5]["frames"] for k in kept], 1, "middles", image_transform(options.image_size, options.augment)),
        "text": text_reader,
    }
    groups = [session(k[1]) for k in kept] if options.grouped_validation else None
    return assemble_splits("iemocap_mla", readers, np.array([k[3] for k in kept]), [f"{k[4]} (utterance '{k[1]}')" for k in kept],
                           parts, classes, val_fraction, split_seed, skipped, groups=groups)


def _token_row(path: Path) -> np.ndarray:
    try:
        ids = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"token file '{path}' cannot be read: {e}") from None
    if ids.ndim not in (1, 2) or (ids.ndim == 2 and ids.shape[0] != 1) or not np.issubdtype(ids.dtype, np.integer):
        raise DataError(f"token file '{path}' holds {ids.dtype} of shape {ids.shape}, expected integer ids (1, T) or (T,)")
    return ids.reshape(-1).astype(np.int64)
