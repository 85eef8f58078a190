"""The released protocols of the papers' code, by name: frame choice, MVSA labels and lists, the
test-selected protocol, grouped validation, AVE duplicates and shipped split lists; on tiny files in
the real layouts."""

import numpy as np
import pytest
import torch
from media_files import write_jpgs

from poise.config import DataConfig, build_config, load_config_file
from poise.data import load_dataset
from poise.data.frames import frame_indices
from poise.data.lazy import FlowReader, FrameReader
from poise.data.media import ImageTransform

SMALL = {"image_size": 32}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- 2. frame choice --------------------------------------------------------------------------------
def test_named_frame_choices_pick_the_released_frames():
    # 10 frames, 3 per clip: OGM-GE reads files 1, 4, 7 (0-based 0, 3, 6) in train and test
    assert frame_indices(10, 3, "segment_starts", None) == [0, 3, 6]
    assert frame_indices(10, 3, "segment_starts", np.random.default_rng(0)) == [0, 3, 6]
    # BalanceBenchmark: random within each segment in training, the segment's first frame at test
    assert frame_indices(10, 3, "segments_then_starts", None) == [0, 3, 6]
    seen = {tuple(frame_indices(10, 3, "segments_then_starts", np.random.default_rng(s))) for s in range(40)}
    assert all(3 * i <= k < 3 * i + 3 for drawn in seen for i, k in enumerate(drawn)) and len(seen) > 5
    # poise's default: the middles at test (2, 5, 8 counted from 1)
    assert frame_indices(10, 3, "segments", None) == [1, 4, 7]
    assert frame_indices(10, 3, "first", np.random.default_rng(0)) == [0, 1, 2]
    # BalanceBenchmark's UCF-101 RGB: the first six files only; 1, 3, 5 at test, one of 1-2, 3-4, 5-6 in training
    assert frame_indices(40, 3, "segments_then_starts", None, window=6) == [0, 2, 4]
    drawn = {k for s in range(40) for k in frame_indices(40, 3, "segments_then_starts", np.random.default_rng(s), window=6)}
    assert drawn == {0, 1, 2, 3, 4, 5}


def test_frame_reader_reads_the_chosen_files(tmp_path):
    write_jpgs(tmp_path / "clip", 10, names="frame_{:05d}.jpg")
    reader = FrameReader([tmp_path / "clip"], 3, "segment_starts", ImageTransform(16))
    assert [p.name for p in reader.frame_paths(0, None)] == ["frame_00001.jpg", "frame_00004.jpg", "frame_00007.jpg"]
    reader = FrameReader([tmp_path / "clip"], 3, "segments_then_starts", ImageTransform(16), window=6)
    assert [p.name for p in reader.frame_paths(0, None)] == ["frame_00001.jpg", "frame_00003.jpg", "frame_00005.jpg"]


def _ramp(folder, value):
    """Flow frames whose left half is 0 and right half ``value``: a flip is visible."""
    from PIL import Image

    folder.mkdir(parents=True)
    image = np.zeros((16, 16), np.uint8)
    image[:, 8:] = value
    for k in range(2):
        Image.fromarray(image, "L").save(folder / f"frame{k + 1:06d}.png")


def test_flow_flip_joint_negates_u_and_independent_does_not(tmp_path):
    _ramp(tmp_path / "u" / "c", 100)
    _ramp(tmp_path / "v" / "c", 200)
    transform = ImageTransform(16, "resize_flip", mean=None, std=None)
    readers = {flip: FlowReader(FrameReader([tmp_path / "u" / "c"], 1, "segments", transform, mode="L"),
                                [tmp_path / "v" / "c"], flip=flip) for flip in ("joint", "independent")}
    u_right, v_right = 100 / 255, 200 / 255
    joint = [readers["joint"].read(0, np.random.default_rng(s))[0] for s in range(30)]
    for x in joint:
        v_flipped = x[1, 0, 0] > 0.5
        # the mirrored video's flow: u mirrored and negated (1 - u around mid-grey)
        expected_u = 1 - np.where(np.arange(16) < 8, u_right, 0.0) if v_flipped else np.where(np.arange(16) < 8, 0.0, u_right)
        np.testing.assert_allclose(x[0, 0], expected_u, atol=1e-6)
    independent = [readers["independent"].read(0, np.random.default_rng(s))[0] for s in range(30)]
    states = set()
    for x in independent:
        u_flipped, v_flipped = x[0, 0, 0] > 0, x[1, 0, 0] > 0
        assert set(np.round(x[0, 0] * 255).astype(int)) == {0, 100}  # never negated
        states.add((bool(u_flipped), bool(v_flipped)))
    assert (True, False) in states and (False, True) in states  # each its own flip


def test_presets_use_the_frames_of_the_quoted_paper():
    choices = {name: load_config_file(name).get("dataset", {}) for name in ("cremad_ogm_ge", "cremad_gblend", "cremad_mla", "vggsound_ogm_ge")}
    assert choices["cremad_ogm_ge"] == {"frames": 1, "frame_sampling": "first"}
    assert choices["cremad_gblend"] == choices["cremad_mla"] == {"frames": 2, "frame_sampling": "segments_then_starts"}
    assert choices["vggsound_ogm_ge"] == {"frames": 3, "frame_sampling": "first"}
