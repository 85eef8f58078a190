"""Image + text datasets: UPMC Food-101 and MVSA-Single.

Texts become token ids (T,) with 0 for padding: by default through a word-level vocabulary built
from the training texts (lower-cased words, ids by frequency, 1 for unknown words; 40 ids; not the
released setting); with ``tokenizer: DIR``, through a Hugging Face tokenizer saved in a local folder,
as each dataset's released code calls BERT's: Food-101 (BalanceBenchmark) 40 ids with the special
tokens, MVSA-Single (MLA) 256 ids without them (``max_length`` and ``special_tokens`` override);
needs the ``transformers`` package, the ``text`` extra, imported only then; nothing is downloaded:
the folder is what ``save_pretrained`` writes.
Texts are tokenised once when the dataset is built (cheap); images are read lazily.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from poise.data.audiovisual import MediaOptions, class_index, dataset_folder
from poise.data.base import DataSplits, ModalitySpec, stratified_split
from poise.data.lazy import ArrayReader, ImageReader, assemble_splits, resolve_problems
from poise.data.media import ImageTransform, random_resized_crop_box
from poise.data.splitlists import list_path
from poise.errors import DataError

PAD, UNKNOWN = 0, 1
WORD = re.compile(r"[a-z0-9']+")


class TextOptions(MediaOptions):
    max_length: int | None = Field(
        None, ge=1, description="tokens per text, padded with 0 or cut (none: 40, or with a tokenizer the dataset's released length)"
    )
    tokenizer: str | None = Field(None, description="folder of a saved Hugging Face tokenizer (default: a word vocabulary)")
    special_tokens: bool | None = Field(
        None, description="with a tokenizer: add its special tokens ([CLS] ... [SEP]) (none: as the dataset's released code)"
    )

    #: the released tokenisation with a (BERT) tokenizer: length and special tokens
    released_text: ClassVar[tuple[int, bool]] = (40, True)

    def text_length(self) -> int:
        if self.max_length is not None:
            return self.max_length
        return self.released_text[0] if self.tokenizer else 40

    def add_special_tokens(self) -> bool:
        return self.released_text[1] if self.special_tokens is None else self.special_tokens
    min_count: int = Field(1, ge=1, description="word vocabulary: words seen fewer times in training are unknown")
    max_vocab: int = Field(30000, ge=2, description="word vocabulary: at most this many ids (with padding and unknown)")


def clean_text(text: str) -> str:
    """The released Food-101 cleaning: no leading 'RT', no links, no '#'."""
    text = re.sub(r"^RT[\s]+", "", text)
    text = re.sub(r"https?://.*[\r\n]*", "", text)
    return text.replace("#", "")


def word_vocabulary(texts: Sequence[str], min_count: int, max_vocab: int) -> dict[str, int]:
    counts = Counter(w for t in texts for w in WORD.findall(t.lower()))
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return {w: i + 2 for i, w in enumerate(words[: max_vocab - 2])}


def hugging_face_ids(texts: Sequence[str], folder: str, max_length: int, special_tokens: bool = True) -> tuple[np.ndarray, int]:
    """Token ids from a Hugging Face tokenizer saved in ``folder`` (``save_pretrained``; never
    downloaded), padded or cut to ``max_length`` with its special tokens, as the released code
    calls BERT's. The encoders take id 0 as padding, so when the tokenizer pads with another id
    the two ids are swapped; the vocabulary size is unchanged."""
    from poise.data.media import require

    path = Path(folder)
    if not path.is_dir():
        raise DataError(f"tokenizer folder '{folder}' does not exist")
    transformers = require("transformers", extra="text")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"tokenizer folder '{folder}' cannot be loaded: {first}") from None
    if tokenizer.pad_token_id is None:
        raise DataError(f"the tokenizer in '{folder}' has no padding token (its pad_token is not set)")
    encoded = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                        add_special_tokens=special_tokens)["input_ids"]
    ids = np.asarray(encoded, dtype=np.int64).reshape(len(texts), max_length)
    pad = int(tokenizer.pad_token_id)
    if pad != PAD:
        ids = np.where(ids == pad, -1, ids)
        ids = np.where(ids == PAD, pad, ids)
        ids[ids == -1] = PAD
    return ids, int(len(tokenizer))


def tokenize_texts(texts: Sequence[str], train_rows: np.ndarray, options: TextOptions) -> tuple[np.ndarray, int]:
    """(N, max_length) int64 ids and the vocabulary size."""
    if options.tokenizer:
        return hugging_face_ids(texts, options.tokenizer, options.text_length(), options.add_special_tokens())
    ids = np.zeros((len(texts), options.text_length()), dtype=np.int64)
    vocab = word_vocabulary([texts[i] for i in train_rows], options.min_count, options.max_vocab)
    for i, text in enumerate(texts):
        words = [vocab.get(w, UNKNOWN) for w in WORD.findall(text.lower())][: options.text_length()]
        ids[i, : len(words)] = words
    return ids, len(vocab) + 2


@dataclass(frozen=True)
class CropJitterTransform:
    """MLA's MVSA-Single images (timm's ``create_transform(256, is_training=True, color_jitter=True)``):
    training: RandomResizedCrop(size, bicubic) + horizontal flip + ColorJitter(1.0, 1.0, 1.0) (brightness,
    contrast and saturation factors drawn in [0, 2], applied in random order, as torchvision does
    through PIL's ImageEnhance); evaluation: the shorter side resized to ``size`` (bicubic), then a
    centre crop. Then ImageNet normalisation, (3, size, size) float32."""

    size: int = 256
    jitter: float = 1.0

    def __call__(self, image, rng: np.random.Generator | None) -> np.ndarray:
        from PIL import Image, ImageEnhance

        bicubic = Image.Resampling.BICUBIC
        if rng is None:
            scale = self.size / min(image.size)
            w, h = max(self.size, round(image.width * scale)), max(self.size, round(image.height * scale))
            image = image.resize((w, h), bicubic)
            left, top = int(round((w - self.size) / 2.0)), int(round((h - self.size) / 2.0))
            image = image.crop((left, top, left + self.size, top + self.size))
        else:
            left, top, w, h = random_resized_crop_box(image.width, image.height, rng)
            image = image.resize((self.size, self.size), bicubic, box=(left, top, left + w, top + h))
            if rng.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
            for k in rng.permutation(3):
                factor = float(rng.uniform(max(0.0, 1 - self.jitter), 1 + self.jitter))
                image = enhancers[k](image).enhance(factor)
        return ImageTransform(self.size, "none")(image, None)


def image_transform(size: int, augment: str):
    return CropJitterTransform(size) if augment == "crop_jitter" else ImageTransform(size, augment)


def image_text_splits(name: str, images: list[Path], texts: list[str], labels: np.ndarray, origins: list[str],
                      parts: dict[str, np.ndarray], classes: Sequence[str], options: TextOptions, val_fraction: float,
                      split_seed: int, skipped: Sequence[str]) -> DataSplits:
    train = parts["train"]
    if "val" not in parts:  # carve val first so that the vocabulary sees only the training texts
        keep, held = stratified_split(labels[train], (1 - val_fraction, val_fraction), split_seed)
        parts = {**parts, "train": train[keep], "val": train[held]}
    ids, vocab_size = tokenize_texts(texts, parts["train"], options)
    readers = {
        "visual": ImageReader(images, image_transform(options.image_size, options.augment)),
        "text": ArrayReader(ids, ModalitySpec("tokens", (options.text_length(),), vocab_size)),
    }
    return assemble_splits(name, readers, labels, origins, parts, classes, val_fraction, split_seed, skipped)


# ---- UPMC Food-101 ----------------------------------------------------------------------------------
class Food101Options(TextOptions):
    texts_dir: str = Field("texts", description="train_titles.csv and test_titles.csv: image name, text, label")
    images_dir: str = Field("images", description="images/<train|test>/<label>/<image name>")
    augment: Literal["rotate_resize_flip", "random_resized_crop", "resize_flip", "none"] = Field(
        "rotate_resize_flip", description="training image augmentation (released: RandomRotation(30), Resize, flip)"
    )


def _food_columns(header: list[str]) -> tuple[int, int, int] | None:
    lower = [h.strip().lower() for h in header]
    if "text" in lower and "label" in lower:
        image = next((i for i, h in enumerate(lower) if "image" in h), 0)
        return image, lower.index("text"), lower.index("label")
    return None


def food101_rows(root: Path, options: Food101Options) -> list[tuple[str, str, str, str, str]]:
    """(image name, text, label, split, origin) of every line of the two title lists."""
    raw = []
    for split in ("train", "test"):
        file = root / options.texts_dir / f"{split}_titles.csv"
        if not file.is_file():
            raise DataError(f"Food-101 {split} list '{file}' does not exist")
        with open(file, encoding="utf-8-sig", newline="") as f:
            lines = list(csv.reader(f))
        columns = _food_columns(lines[0]) if lines else None
        start = 1 if columns else 0
        image_col, text_col, label_col = columns or (0, 1, 2)
        for number, fields in enumerate(lines[start:], start=start + 1):
            if not fields:
                continue
            origin = f"{file.name} line {number}"
            if len(fields) <= max(image_col, text_col, label_col):
                raise DataError(f"{origin}: expected image name, text and label, got {fields!r}")
            raw.append((fields[image_col], fields[text_col], fields[label_col], split, origin))
    return raw


def build_food101(arg: str | None, options: Food101Options, val_fraction: float, split_seed: int) -> DataSplits:
    root = dataset_folder(arg, "food101")
    train_images = root / options.images_dir / "train"
    raw = food101_rows(root, options)
    if train_images.is_dir():
        classes = sorted(p.name for p in train_images.iterdir() if p.is_dir())
    else:
        classes = sorted({r[2] for r in raw})
    problems, kept = [], []
    for image, text, label, split, origin in raw:
        index = class_index(label, classes, origin)
        path = root / options.images_dir / split / label / image
        if not path.is_file():
            problems.append(f"{origin}: image file '{path}' does not exist")
            continue
        kept.append((path, clean_text(text), index, split, origin))
    skipped = resolve_problems("food101", problems, options.on_missing)
    splits = np.array([k[3] for k in kept])
    parts = {s: np.flatnonzero(splits == s) for s in ("train", "test")}
    return image_text_splits("food101", [k[0] for k in kept], [k[1] for k in kept], np.array([k[2] for k in kept]),
                             [k[4] for k in kept], parts, classes, options, val_fraction, split_seed, skipped)


# ---- MVSA-Single ------------------------------------------------------------------------------------
MVSA_CLASSES = ("negative", "neutral", "positive")


class MvsaOptions(TextOptions):
    labels_file: str = Field("labelResultAll.txt", description="tab-separated 'ID<TAB>text_label,image_label' with a header")
    data_dir: str = Field("data", description="data/<ID>.jpg and data/<ID>.txt")
    label_rule: Literal["agree", "neutral_yields"] = Field(
        "agree", description="agree: only posts whose text and image labels are equal (the released lists of MLA and "
        "QMF); neutral_yields: neutral gives way to a polar label (MultiSentiNet), positive/negative conflicts dropped"
    )
    split: Literal["released", "random"] = Field(
        "released", description="released: the train/dev/test lists (train_list, dev_list, test_list; dev is the "
        "validation split); random: a stratified test share test_fraction and a validation share of train"
    )
    train_list: str = Field("train.jsonl", description="released training list, JSON lines with 'id' (and 'label')")
    dev_list: str = Field("dev.jsonl", description="released validation list, same format")
    test_list: str = Field("test.jsonl", description="released test list, same format")
    test_fraction: float = Field(0.1, gt=0, lt=1, description="split random: share held out for test, stratified")
    augment: Literal["rotate_resize_flip", "random_resized_crop", "resize_flip", "crop_jitter", "none"] = Field(
        "random_resized_crop", description="training image augmentation; crop_jitter (with image_size 256): MLA's bicubic "
        "RandomResizedCrop + flip + colour jitter 1.0, test Resize + CenterCrop"
    )

    released_text: ClassVar[tuple[int, bool]] = (256, False)  # MLA: BERT ids, 256, no special tokens


def mvsa_label(text_label: str, image_label: str, rule: str = "neutral_yields") -> str | None:
    """One label per post. ``agree``: the two labels equal, else none (the rule behind the released
    lists: 2,592 posts). ``neutral_yields`` (MultiSentiNet's rule): equal labels stand, neutral
    yields to a polar label, a positive / negative conflict has none (4,511 posts). A post without
    a label is left out and listed."""
    if text_label == image_label:
        return text_label
    if rule == "agree":
        return None
    if "neutral" in (text_label, image_label):
        return image_label if text_label == "neutral" else text_label
    return None


def mvsa_rows(root: Path, options: MvsaOptions) -> list[tuple[str, str, str, str]]:
    """(post ID, text label, image label, origin) of every line of the label file."""
    file = root / options.labels_file
    if not file.is_file():
        raise DataError(f"MVSA label file '{file}' does not exist")
    rows = []
    for number, line in enumerate(file.read_text(encoding="utf-8-sig").splitlines(), start=1):
        fields = line.split("\t")
        if number == 1 and not fields[0].strip().isdigit() or not line.strip():
            continue
        origin = f"{file.name} line {number}"
        pair = fields[1].split(",") if len(fields) == 2 else []
        if len(pair) != 2:
            raise DataError(f"{origin}: expected 'ID<TAB>text_label,image_label', got '{line}'")
        for x in pair:
            class_index(x.strip(), MVSA_CLASSES, origin)
        rows.append((fields[0].strip(), pair[0].strip(), pair[1].strip(), origin))
    return rows


def mvsa_released_lists(root: Path, options: MvsaOptions) -> dict[str, list[tuple[str, str | None, str]]]:
    """split -> [(post ID, label or None, origin)] of the released lists (the folder's own, else
    poise's shipped copy)."""
    import json

    out = {}
    for split, name in (("train", options.train_list), ("val", options.dev_list), ("test", options.test_list)):
        path = list_path(root, "mvsa", name)
        if not path.is_file():
            raise DataError(f"MVSA-Single's released {split} list '{root / name}' does not exist and poise ships none; "
                            "put the released lists (train.jsonl, dev.jsonl, test.jsonl) there, or use "
                            "--set dataset.split=random for a stratified split of the labelled posts")
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
            if not line.strip():
                continue
            origin = f"{name} line {number}"
            try:
                item = json.loads(line)
                post = str(item["id"]).strip()
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{origin}: expected a JSON object with an 'id' (and a 'label'), got '{line[:80]}'") from None
            label = item.get("label")
            if label is not None:
                class_index(str(label), MVSA_CLASSES, origin)
            rows.append((post, None if label is None else str(label), origin))
        out[split] = rows
    return out


def build_mvsa(arg: str | None, options: MvsaOptions, val_fraction: float, split_seed: int) -> DataSplits:
    root = dataset_folder(arg, "mvsa")
    file = root / options.labels_file
    rule = options.label_rule
    problems, conflicts, kept = [], [], []
    labelled = {}
    for post, text_label, image_label, origin in mvsa_rows(root, options):
        label = mvsa_label(text_label, image_label, rule)
        if label is None:
            conflicts.append(f"{origin}: post {post} has text label '{text_label}' and image label '{image_label}' "
                             f"(label_rule {rule})")
            continue
        labelled[post] = (label, origin)
    if options.split == "released":
        listed = [(post, split, given, origin) for split, rows in mvsa_released_lists(root, options).items()
                  for post, given, origin in rows]
    else:
        listed = [(post, None, None, origin) for post, (_, origin) in labelled.items()]
    splits = []
    for post, split, given, origin in listed:
        label = given if given is not None else labelled.get(post, (None,))[0]
        if label is None:
            problems.append(f"{origin}: post {post} has no label under label_rule {rule} in '{file.name}'")
            continue
        image, text = root / options.data_dir / f"{post}.jpg", root / options.data_dir / f"{post}.txt"
        lacking = next((p for p in (image, text) if not p.is_file()), None)
        if lacking is not None:
            problems.append(f"{origin}: file '{lacking}' does not exist")
            continue
        kept.append((image, text.read_bytes().decode("utf-8", errors="replace").strip(), MVSA_CLASSES.index(label), origin))
        splits.append(split)
    # with the released lists, the posts without a label are simply not listed
    skipped = resolve_problems("mvsa", problems, options.on_missing) + (conflicts if options.split == "random" else [])
    labels = np.array([k[2] for k in kept])
    if len(kept) == 0:
        raise DataError(f"mvsa: '{file}' lists no usable post")
    if options.split == "released":
        where = np.array(splits)
        parts = {s: np.flatnonzero(where == s) for s in ("train", "val", "test")}
    else:
        train, test = stratified_split(labels, (1 - options.test_fraction, options.test_fraction), split_seed)
        parts = {"train": train, "test": test}
    return image_text_splits("mvsa", [k[0] for k in kept], [k[1] for k in kept], labels, [k[3] for k in kept],
                             parts, MVSA_CLASSES, options, val_fraction, split_seed, skipped)
