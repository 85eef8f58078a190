"""Check poise's shipped Kinetics-Sounds class list against Kinetics annotation files.

    python scripts/check_kinetics_sounds_classes.py kinetics-400_train.csv kinetics-400_val.csv ...

The shipped lists (``my_train.txt``, ``my_test.txt``) give each clip a class index; ``class.txt`` names the
indices. Every Kinetics annotation CSV (header ``label,youtube_id,...``, as DeepMind distributes them)
labels YouTube ids, so each listed clip whose id an annotation file labels is a witness: its index's name in
``class.txt`` must be its Kinetics label. Printed: per class index, its name, how many clips agree and which
labels disagree, and the indices no file witnesses. Exit status: 0 when no clip disagrees, 1 when some do,
2 when a file cannot be read.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import Counter, defaultdict
from pathlib import Path

SPLITS = Path(__file__).resolve().parents[1] / "src" / "poise" / "data" / "assets" / "splits" / "kinetics_sounds"
YOUTUBE_ID = 11


def read_annotations(paths: list[Path]) -> dict[str, set[str]]:
    labels: dict[str, set[str]] = defaultdict(set)
    for path in paths:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or not {"label", "youtube_id"} <= set(reader.fieldnames):
                raise ValueError(f"'{path}' has no 'label' and 'youtube_id' columns (header: {reader.fieldnames})")
            for row in reader:
                labels[row["youtube_id"]].add(row["label"].strip())
    return labels


def check(splits: Path, annotations: dict[str, set[str]]) -> tuple[list[str], dict[int, Counter], list[int]]:
    """(class names, per index a Counter of 'agree' and each disagreeing label, indices with no witness)."""
    from poise.data.audiovisual import read_class_file

    classes = read_class_file(splits / "class.txt")
    if classes is None:
        raise ValueError(f"'{splits / 'class.txt'}' does not exist")
    found: dict[int, Counter] = defaultdict(Counter)
    for name in ("my_train.txt", "my_test.txt"):
        for line in (splits / name).read_text(encoding="utf-8-sig").splitlines():
            if not line.strip():
                continue
            fields = line.strip().split(",")
            index = int(fields[-1])
            for label in annotations.get(fields[0][:YOUTUBE_ID], ()):
                found[index]["agree" if label == classes[index] else label] += 1
    return classes, found, [i for i in range(len(classes)) if i not in found]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("annotations", nargs="+", type=Path, help="Kinetics annotation CSV files")
    parser.add_argument("--splits", type=Path, default=SPLITS, help="folder holding class.txt and the two lists")
    args = parser.parse_args(argv)
    from poise.errors import PoiseError

    try:
        classes, found, unwitnessed = check(args.splits, read_annotations(args.annotations))
    except (OSError, ValueError, PoiseError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    wrong = 0
    for index in sorted(found):
        counts = found[index]
        others = {k: v for k, v in counts.items() if k != "agree"}
        wrong += sum(others.values())
        extra = "; disagree: " + ", ".join(f"{k} ({v})" for k, v in sorted(others.items())) if others else ""
        print(f"{index:3d} {classes[index]}: {counts['agree']} clips agree{extra}")
    print(f"{len(classes) - len(unwitnessed)} of {len(classes)} classes witnessed"
          + (f"; none for {', '.join(str(i) for i in unwitnessed)}" if unwitnessed else ""))
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
