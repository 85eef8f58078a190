"""How far ``poise prepare``'s audio features are from the released pipelines' on the same files.

Writes small raw folders for CREMA-D, VGGSound, Kinetics-Sounds and AVE (wavs at several rates,
mono and stereo, clips that need tiling, padding, cutting and clipping, and a clip that exists only
as a video), runs ``poise prepare`` on each and compares every cached clip with the released
computation recomputed without poise (tests/released_audio.py: librosa for the STFT sets, a naive
float64 Kaldi filter-bank for the others). VGGSound is compared at the same crop starts on both
sides (0, 1.96 s, 5 s) and at poise's evaluation crop.

    PYTHONPATH=src .venv/bin/python scripts/audio_fidelity.py
    PYTHONPATH=/path/to/other/checkout/src .venv/bin/python scripts/audio_fidelity.py   # another version

Prints a markdown table: the largest absolute difference per dataset (log-magnitude units for the
STFT sets, normalised filter-bank units for the others) and the clip where it occurs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from released_audio import (  # noqa: E402
    CLIPS,
    DATASETS,
    FixedStart,
    librosa_load,
    released_ave,
    released_cremad,
    released_kinetics_sounds,
    released_vggsound,
    write_raw,
)

REFERENCE = {"cremad": released_cremad, "kinetics_sounds": released_kinetics_sounds, "ave": released_ave}
VGG_STARTS = (0, 31415, 80000)


def measure(dataset: str, folder: Path) -> list[tuple[str, str, float]]:
    """(clip, what, largest difference) for every clip of ``dataset``."""
    from poise.data.audiovisual import AUDIO_VISUAL_SETS
    from poise.data.prepare import run_prepare

    raw, out = folder / "raw", folder / "out"
    clips = CLIPS[dataset]
    sources = write_raw(dataset, raw, out, clips)
    summary = run_prepare(dataset, raw, out, workers=1, progress=False)
    if summary["skipped"]:
        raise SystemExit(f"poise prepare skipped clips: {(out / 'prepare_report.txt').read_text()}")
    features = AUDIO_VISUAL_SETS[dataset].features
    rows = []
    for clip in clips:
        stored = np.load(out / DATASETS[dataset][3] / f"{clip.name}.npy")
        if dataset != "vggsound":
            rows.append((clip.name, clip.describe(), float(np.abs(stored - REFERENCE[dataset](sources[clip.name])).max())))
            continue
        for start in VGG_STARTS:
            ours = features.from_cache(stored, FixedStart(start))
            diff = float(np.abs(ours - released_vggsound(sources[clip.name], start)).max())
            rows.append((clip.name, f"{clip.describe()}, crop at {start / 16000:.2f} s", diff))
        start = max(0, (len(stored) - 80000) // 2)  # poise's evaluation start, then and now
        length = len(librosa_load(sources[clip.name], 16000))
        wraps = length >= 80000 and start + 80000 > length
        diff = float(np.abs(features.from_cache(stored, None) - released_vggsound(sources[clip.name], start)).max())
        rows.append((clip.name, f"{clip.describe()}, evaluation crop at {start / 16000:.2f} s"
                                f"{' (wraps round)' if wraps else ''}", diff))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default=",".join(CLIPS), help="comma-separated, of " + ", ".join(CLIPS))
    parser.add_argument("--detail", action="store_true", help="one row per clip")
    args = parser.parse_args(argv)
    import poise

    print(f"poise from {Path(poise.__file__).parent}\n")
    print("| dataset | largest difference | where |\n|---|---|---|")
    detail = []
    with tempfile.TemporaryDirectory() as tmp:
        for dataset in args.datasets.split(","):
            rows = measure(dataset, Path(tmp) / dataset)
            clip, what, diff = max(rows, key=lambda r: r[2])
            print(f"| {dataset} | {diff:.3g} | {clip}: {what} |", flush=True)
            detail += [(dataset, *r) for r in rows]
    if args.detail:
        print("\n| dataset | clip | input | difference |\n|---|---|---|---|")
        for dataset, clip, what, diff in detail:
            print(f"| {dataset} | {clip} | {what} | {diff:.3g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
