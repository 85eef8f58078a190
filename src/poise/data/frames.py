"""Which frames of a clip's sorted frame list a loader reads: poise's choice and each released one.

``first``                 the first ``count`` frames, train and test (OGM-GE's CREMA-D: 1 frame,
                          VGGSound: 3).
``segments``              poise's default: the list cut into ``count`` equal segments, a random frame
                          of each in training, the middle of each at evaluation.
``segment_starts``        the first frame of each segment, train and test (OGM-GE's Kinetics-Sounds
                          and AVE: frames 1, 4, 7 of 10; MLA's CREMA-D, 3 frames).
``middles``               the middle of each segment, train and test (MLA's IEMOCAP: the middle frame).
``segments_then_starts``  a random frame of each segment in training, the first of each at evaluation
                          (BalanceBenchmark's Kinetics-Sounds, AVE, CREMA-D and UCF-101).

``window``: only the first ``window`` files of the sorted list take part (BalanceBenchmark's UCF-101
reads its RGB frames from the first six files: one of 1-2, 3-4, 5-6 in training, 1, 3, 5 at test).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from poise.data.media import sample_frame_indices

FrameChoice = Literal["first", "segments", "segment_starts", "segments_then_starts", "middles"]
FRAME_CHOICES: tuple[str, ...] = ("first", "segments", "segment_starts", "segments_then_starts", "middles")


def frame_indices(available: int, count: int, choice: str, rng: np.random.Generator | None,
                  window: int | None = None) -> list[int]:
    """Indices into a sorted frame list of ``available`` files; ``rng`` None at evaluation."""
    if window is not None:
        available = min(available, window)
    if choice in ("first", "segments"):
        return sample_frame_indices(available, count, choice, rng)
    segment = available // count
    if choice == "middles":
        return sample_frame_indices(available, count, "segments", None)
    if choice == "segment_starts" or rng is None:
        return [i * segment for i in range(count)]
    if choice == "segments_then_starts":
        return [i * segment + int(rng.integers(0, segment)) for i in range(count)]
    raise ValueError(f"frame choice '{choice}' is not one of {', '.join(FRAME_CHOICES)}")
