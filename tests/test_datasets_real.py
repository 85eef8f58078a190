"""The real datasets' loaders, preprocessing and the seed papers' encoders, on tiny files written here."""

import math
import pickle
import sys

import numpy as np
import pytest
import torch
from media_files import CREMAD, write_cremad, write_feature_pickle, write_jpgs, write_wav
from torch import nn

from poise.config import DataConfig
from poise.data import load_dataset
from poise.data.base import ModalitySpec
from poise.data.batch import collate
from poise.data.lazy import LazyMultimodalDataset
from poise.data.media import (
    ClipSpectrogram,
    CroppedSpectrogram,
    ImageTransform,
    NormalisedFbank,
    kaldi_fbank,
    log_stft,
    random_resized_crop_box,
    sample_frame_indices,
)
from poise.errors import DataError, IncompatibleError
from poise.models.encoders import ENCODERS
from poise.models.resnet import ResNet18Encoder, TextEncoder, TransformerSequenceEncoder

SMALL = {"image_size": 32}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


# ---- encoders ---------------------------------------------------------------------------------------
def test_resnet18_trunk_has_the_published_size_and_init():
    enc = ResNet18Encoder(ModalitySpec("frames", (2, 3, 32, 32)), 512)
    assert sum(p.numel() for p in enc.trunk.parameters()) == 11_176_512  # torchvision resnet18 without fc
    audio = ResNet18Encoder(ModalitySpec("spectrogram", (1, 257, 188)), 512)
    assert sum(p.numel() for p in audio.trunk.parameters()) == 11_176_512 - 2 * 64 * 7 * 7
    conv = enc.trunk.layer3[0].conv1  # 128 -> 256, 3x3: Kaiming fan-out std sqrt(2 / (256 * 9))
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (256 * 9)), rel=0.05)
    assert torch.all(enc.trunk.bn1.weight == 1) and torch.all(enc.trunk.bn1.bias == 0)
    assert isinstance(enc.project, nn.Identity)
    projected = ResNet18Encoder(ModalitySpec("image", (3, 32, 32)), 64)
    linear = projected.project[0]
    bound = math.sqrt(6 / (512 + 64))  # Xavier uniform
    assert linear.weight.abs().max().item() <= bound and linear.weight.abs().max().item() > 0.9 * bound


def test_resnet18_shapes_for_every_input_kind():
    torch.manual_seed(0)
    cases = [(ModalitySpec("spectrogram", (1, 40, 36)), (2, 1, 40, 36)), (ModalitySpec("image", (3, 32, 32)), (2, 3, 32, 32)),
             (ModalitySpec("frames", (3, 3, 32, 32)), (2, 3, 3, 32, 32)), (ModalitySpec("frames", (3, 2, 32, 32)), (2, 3, 2, 32, 32))]
    for spec, shape in cases:
        assert ResNet18Encoder(spec, 512)(torch.randn(shape)).shape == (2, 512)
    assert ResNet18Encoder(ModalitySpec("image", (3, 32, 32)), 16)(torch.randn(2, 3, 32, 32)).shape == (2, 16)
    with pytest.raises(IncompatibleError, match="resnet18 encoder needs"):
        ResNet18Encoder(ModalitySpec("vector", (8,)), 512)


def test_frames_are_pooled_over_time_like_a_3d_average_pool():
    torch.manual_seed(0)
    enc = ResNet18Encoder(ModalitySpec("frames", (2, 3, 32, 32)), 512).eval()
    x = torch.randn(1, 2, 3, 32, 32)
    per_frame = torch.stack([enc.trunk(x[:, t]).mean(dim=(2, 3)) for t in range(2)]).mean(0)
    torch.testing.assert_close(enc(x), per_frame, rtol=1e-4, atol=1e-5)


def test_sequence_and_text_encoders():
    torch.manual_seed(0)
    seq = TransformerSequenceEncoder(ModalitySpec("sequence", (6, 10)), 32)
    assert seq(torch.randn(3, 6, 10)).shape == (3, 32)
    for rnn in ("transformer", "gru"):
        text = TextEncoder(ModalitySpec("tokens", (7,), vocab_size=20), 32, embed_dim=16, rnn=rnn).eval()
        tokens = torch.tensor([[3, 4, 5, 0, 0, 0, 0], [0] * 7])  # the second: a missing text
        out = text(tokens)
        assert out.shape == (2, 32) and torch.isfinite(out).all()
        longer = torch.tensor([[3, 4, 5, 0, 0, 0, 0]])
        torch.testing.assert_close(text(longer), out[:1])  # padding does not change the features
    assert {"resnet18", "transformer", "text"} <= set(ENCODERS)


# ---- preprocessing ----------------------------------------------------------------------------------
def naive_log_stft(x, n_fft, hop):
    padded = np.pad(x, n_fft // 2)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    frames = [padded[s: s + n_fft] * window for s in range(0, len(padded) - n_fft + 1, hop)]
    return np.log(np.abs(np.stack([np.fft.rfft(f) for f in frames], axis=1)) + 1e-7)


def test_log_stft_matches_a_direct_fourier_transform():
    x = np.random.default_rng(0).standard_normal(3000).astype(np.float32)
    np.testing.assert_allclose(log_stft(x, 256, 128), naive_log_stft(x.astype(np.float64), 256, 128), atol=1e-5)


def test_published_audio_shapes():
    rng = np.random.default_rng(0)
    short = (0.1 * rng.standard_normal(5000)).astype(np.float32)
    spec = ClipSpectrogram()(short, None)
    assert spec.shape == (257, 188)
    tiled = np.tile(short, 14)[: 3 * 22050]
    np.testing.assert_allclose(spec, log_stft(tiled, 512, 353), atol=1e-5)  # tiled and cut to 3 s
    vgg = CroppedSpectrogram()
    stored = vgg.cache_array(short)
    assert stored.dtype == np.float32 and len(stored) == len(short)  # tiled when read
    assert vgg.from_cache(stored, None).shape == (129, 626)
    np.testing.assert_array_equal(vgg.from_cache(stored, None), vgg.from_cache(stored, None))
    fbank = NormalisedFbank()(short, None)
    assert fbank.shape == (1024, 128)
    assert np.allclose(fbank[40:], (0 + 4.503877) / (2 * 5.141276))  # zero padding after the 29 frames


def naive_kaldi_fbank(wave, sr, bins):
    size, shift, padded = 400, 160, 512
    mel = lambda f: 1127 * np.log(1 + f / 700)  # noqa: E731
    lo, hi = mel(20.0), mel(sr / 2)
    edges = lo + np.arange(bins + 2) * (hi - lo) / (bins + 1)
    out = []
    for start in range(0, len(wave) - size + 1, shift):
        frame = wave[start: start + size].astype(np.float64)
        frame = frame - frame.mean()
        frame = np.array([frame[i] - 0.97 * frame[max(i - 1, 0)] for i in range(size)])
        frame = frame * (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(size) / (size - 1)))
        power = np.abs(np.fft.rfft(frame, padded)) ** 2
        energies = []
        for b in range(bins):
            total = 0.0
            for k in range(padded // 2):
                m = mel(k * sr / padded)
                weight = max(0.0, min((m - edges[b]) / (edges[b + 1] - edges[b]), (edges[b + 2] - m) / (edges[b + 2] - edges[b + 1])))
                total += weight * power[k]
            energies.append(np.log(max(total, np.finfo(np.float32).eps)))
        out.append(energies)
    return np.array(out)


def test_kaldi_fbank_matches_a_frame_by_frame_reference():
    wave = np.random.default_rng(1).standard_normal(1200).astype(np.float32)
    ours = kaldi_fbank(wave, 16000, num_mel_bins=16)
    assert ours.shape == (1 + (1200 - 400) // 160, 16)
    np.testing.assert_allclose(ours, naive_kaldi_fbank(wave, 16000, 16), rtol=0, atol=1e-5)


def test_image_transforms_and_frame_choice():
    rng = np.random.default_rng(0)
    for _ in range(50):
        left, top, w, h = random_resized_crop_box(60, 40, rng)
        assert 0 <= left and left + w <= 60 and 0 <= top and top + h <= 40 and w > 0 and h > 0
    from PIL import Image

    image = Image.fromarray(np.full((30, 40, 3), 255, np.uint8))
    x = ImageTransform(16)(image, None)
    assert x.shape == (3, 16, 16)
    np.testing.assert_allclose(x[:, 0, 0], (1 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]), rtol=1e-5)
    assert sample_frame_indices(10, 3, "segments", None) == [1, 4, 7]
    assert sample_frame_indices(10, 2, "first", None) == [0, 1]
    drawn = sample_frame_indices(10, 3, "segments", np.random.default_rng(3))
    assert all(3 * i <= k < 3 * i + 3 for i, k in enumerate(drawn))


# ---- CREMA-D ----------------------------------------------------------------------------------------
@pytest.fixture
def cremad_root(tmp_path):
    root = tmp_path / "cremad"
    write_cremad(root)
    return root


def test_cremad_released_layout(cremad_root):
    splits = load_dataset(f"cremad:{cremad_root}", SMALL, DataConfig(val_fraction=0.5))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 6, 6)
    assert splits.info.class_names == CREMAD and splits.info.num_classes == 6
    assert splits.info.modalities["visual"] == ModalitySpec("frames", (1, 3, 32, 32))
    inputs, label, present, index = splits.test[0]
    assert inputs["audio"].shape == (1, 257, 188) and inputs["visual"].shape == (1, 3, 32, 32)
    assert label == 0 and present.all() and index == 0
    batch = collate([splits.train[i] for i in range(3)])
    assert batch.inputs["visual"].shape == (3, 1, 3, 32, 32)
    # evaluation transforms are deterministic; training augmentation follows torch's seed
    torch.testing.assert_close(splits.test[1][0]["visual"], splits.test[1][0]["visual"])
    torch.manual_seed(5)
    first = splits.train[0][0]["visual"]
    torch.manual_seed(5)
    torch.testing.assert_close(splits.train[0][0]["visual"], first)
    assert not torch.equal(splits.train[0][0]["visual"], first)
    assert set(splits.train.labels.tolist()) == set(range(6))


def test_cremad_val_is_carved_from_train_only(cremad_root):
    splits = load_dataset(f"cremad:{cremad_root}", SMALL, DataConfig(val_fraction=0.5, split_seed=3))
    test_clips = {splits.test.origins[r] for r in splits.test.rows}
    assert all("test.csv" in o for o in test_clips)
    train_val = [splits.train.origins[r] for r in np.concatenate([splits.train.rows, splits.val.rows])]
    assert all("train.csv" in o for o in train_val) and len(set(train_val)) == 12


def test_missing_modality_is_zero_and_never_read(cremad_root):
    splits = load_dataset(f"cremad:{cremad_root}", SMALL, DataConfig(missing_rate=0.5, val_fraction=0.5))
    ds = splits.train
    assert isinstance(ds, LazyMultimodalDataset) and not ds.present.all()
    i = int((~ds.present[:, 1]).nonzero()[0])
    inputs, _, present, _ = ds[i]
    assert not present[1] and torch.count_nonzero(inputs["visual"]) == 0


def test_cremad_missing_file_names_the_file_and_row(cremad_root):
    clip = (cremad_root / "train.csv").read_text().splitlines()[2].split(",")[0]
    (cremad_root / "AudioWAV" / f"{clip}.wav").unlink()
    with pytest.raises(DataError, match=rf"train.csv line 3 \(clip '{clip}'\): neither .*AudioWAV/{clip}.wav' exists"):
        load_dataset(f"cremad:{cremad_root}", SMALL, DataConfig())
    splits = load_dataset(f"cremad:{cremad_root}", {**SMALL, "on_missing": "skip"}, DataConfig(val_fraction=0.5))
    assert len(splits.train) + len(splits.val) == 11
    assert len(splits.notes["skipped"]) == 1 and clip in splits.notes["skipped"][0]


def test_cremad_label_outside_the_class_list(cremad_root):
    (cremad_root / "test.csv").write_text((cremad_root / "test.csv").read_text() + "1099_X_CAL_XX,CAL\n")
    with pytest.raises(DataError, match=r"test.csv line 7: label 'CAL' is not in the class list \(NEU, HAP"):
        load_dataset(f"cremad:{cremad_root}", SMALL, DataConfig())


def test_cremad_too_few_frames(cremad_root):
    with pytest.raises(DataError, match=r"frame folder .* has 2 frames, 3 needed"):
        load_dataset(f"cremad:{cremad_root}", {**SMALL, "frames": 3}, DataConfig())


def test_unreadable_or_empty_files_are_named_at_read_time(cremad_root):
    clip = (cremad_root / "test.csv").read_text().splitlines()[0].split(",")[0]
    (cremad_root / "Image-01-FPS" / clip / "00001.jpg").write_bytes(b"not a jpeg")
    splits = load_dataset(f"cremad:{cremad_root}", SMALL, DataConfig())
    with pytest.raises(DataError, match=rf"test.csv line 1 \(clip '{clip}'\): image file .*00001.jpg' cannot be read"):
        splits.test[0]
    other = (cremad_root / "test.csv").read_text().splitlines()[1].split(",")[0]
    write_wav(cremad_root / "AudioWAV" / f"{other}.wav", seconds=0.0)
    with pytest.raises(DataError, match=rf"test.csv line 2 .*{other}.wav' is empty"):
        splits.test[1]
    third = (cremad_root / "test.csv").read_text().splitlines()[2].split(",")[0]
    (cremad_root / "AudioWAV" / f"{third}.wav").write_bytes(b"RIFF garbage")
    with pytest.raises(DataError, match=rf"test.csv line 3 .*{third}.wav' cannot be read"):
        splits.test[2]


def test_prepared_array_of_the_wrong_shape(cremad_root):
    clip = (cremad_root / "test.csv").read_text().splitlines()[0].split(",")[0]
    (cremad_root / "spectrogram").mkdir()
    np.save(cremad_root / "spectrogram" / f"{clip}.npy", np.zeros((257, 100), np.float32))
    splits = load_dataset(f"cremad:{cremad_root}", SMALL, DataConfig())
    with pytest.raises(DataError, match=r"holds an array of shape \(257, 100\), expected \(257, 188\)"):
        splits.test[0]


def test_missing_media_package_names_the_extra(monkeypatch, cremad_root):
    import sys

    splits = load_dataset(f"cremad:{cremad_root}", SMALL, DataConfig())
    monkeypatch.setitem(sys.modules, "soundfile", None)  # import soundfile now raises ImportError
    with pytest.raises(DataError, match=r"'soundfile' package, part of the media extra: pip install 'poise\[media\]'"):
        splits.test[0]


def test_cremad_trains_end_to_end_with_resnet18(cremad_root):
    from poise.bench import run_config
    from poise.methods import make_method
    from poise.train import Trainer

    spec = f"cremad:{cremad_root}"
    cfg = run_config(spec, {"dataset": SMALL, "data": {"val_fraction": 0.5, "missing_rate": 0.2},
                            "trainer": {"epochs": 1, "batch_size": 6, "progress": False, "tensorboard": False, "probe": False}})
    assert cfg.model.encoders == {"audio": "resnet18", "visual": "resnet18"} and cfg.model.feature_dim == 512
    splits = load_dataset(spec, cfg.dataset, cfg.data)
    method = make_method("joint", {})
    initial: dict = {}
    setup = method.setup

    def snapshot(ctx):
        initial.update({n: p.detach().clone() for n, p in ctx.model.named_parameters()})
        setup(ctx)

    method.setup = snapshot
    trainer = Trainer(splits, method, cfg, seed=0)
    result = trainer.fit()
    assert 0.0 <= result.test["accuracy"] <= 1.0 and math.isfinite(result.history[0]["train_loss"])
    for m in ("audio", "visual"):  # both ResNet-18 encoders took optimizer steps
        assert any(not torch.equal(p.detach(), initial[n]) for n, p in trainer.model.named_parameters()
                   if n.startswith(f"encoders.{m}.")), m


# ---- Kinetics-Sounds, AVE, VGGSound, UCF-101 --------------------------------------------------------
def _av_clips(root, clips, audio_seconds=0.3, frames=3, sample_rate=16000):
    for i, clip in enumerate(clips):
        write_wav(root / "audio" / f"{clip}.wav", seconds=audio_seconds, sample_rate=sample_rate, seed=i)
        write_jpgs(root / "visual" / clip, frames, seed=i, names="frame_{:05d}.jpg")


def test_kinetics_sounds_layout(tmp_path):
    root = tmp_path / "ks"
    clips = [f"vid{i}_000001_000011" for i in range(8)]
    _av_clips(root, clips)
    (root / "class.txt").write_text("playing piano,tap dancing")
    (root / "my_train.txt").write_text("".join(f"{c},10,{i % 2}\n" for i, c in enumerate(clips[:6])))
    (root / "my_test.txt").write_text("".join(f"{c},10,{i % 2}\n" for i, c in enumerate(clips[6:])))
    splits = load_dataset(f"kinetics_sounds:{root}", SMALL, DataConfig(val_fraction=0.34))
    assert splits.info.class_names == ("playing piano", "tap dancing")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (4, 2, 2)
    inputs = splits.test[0][0]
    assert inputs["audio"].shape == (1, 1024, 128) and inputs["visual"].shape == (3, 3, 32, 32)
    (root / "my_test.txt").write_text(f"{clips[6]},10,5\n")
    with pytest.raises(DataError, match=r"my_test.txt line 1: label '5' is not in the class list"):
        load_dataset(f"kinetics_sounds:{root}", SMALL, DataConfig())


def test_ave_layout_with_its_official_validation_list(tmp_path):
    root = tmp_path / "ave"
    ids = [f"v{i:03d}" for i in range(6)]
    _av_clips(root, ids)
    cats = ["Church bell", "Male speech, man speaking"]
    header = "Category&VideoID&Quality&StartTime&EndTime\n"
    line = lambda i: f"{cats[i % 2]}&{ids[i]}&good&0&10\n"  # noqa: E731
    (root / "Annotations.txt").write_text(header + "".join(line(i) for i in range(6)))
    (root / "trainSet.txt").write_text(header + line(0) + line(1))
    (root / "valSet.txt").write_text(line(2) + line(3))
    (root / "testSet.txt").write_text(line(4) + line(5))
    splits = load_dataset(f"ave:{root}", SMALL, DataConfig())
    assert splits.info.class_names == tuple(sorted(cats))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (2, 2, 2)
    assert splits.val.labels.tolist() == [0, 1]


def test_vggsound_crop_is_random_in_training_and_centred_in_test(tmp_path):
    root = tmp_path / "vgg"
    rows = [(f"yt{i}", i, ("dog", "cat")[i % 2], "train" if i < 4 else "test") for i in range(6)]
    _av_clips(root, [f"{a}_{b}" for a, b, _, _ in rows], audio_seconds=0.2, sample_rate=8000)
    (root / "vggsound.csv").write_text("".join(f"{a},{b},{c},{d}\n" for a, b, c, d in rows))
    splits = load_dataset(f"vggsound:{root}", SMALL, DataConfig(val_fraction=0.5))
    assert splits.info.class_names == ("cat", "dog")
    audio = splits.test[0][0]["audio"]
    assert audio.shape == (1, 129, 626)
    torch.testing.assert_close(splits.test[0][0]["audio"], audio)
    (root / "vggsound.csv").write_text("yt0,0,dog,dev\n")
    with pytest.raises(DataError, match="vggsound.csv line 1: expected 'youtube_id,start_seconds,label,train|test'"):
        load_dataset(f"vggsound:{root}", SMALL, DataConfig())


def test_ucf101_rgb_and_flow(tmp_path):
    root = tmp_path / "ucf"
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 Archery\n")
    videos = [f"v_{c}_g0{i}_c01" for i in range(1, 4) for c in ("ApplyEyeMakeup", "Archery")]
    for i, v in enumerate(videos):
        write_jpgs(root / "frames" / v, 4, seed=i)
        write_jpgs(root / "flow" / "u" / v, 4, seed=i, mode="L", names="frame{:06d}.jpg")
        write_jpgs(root / "flow" / "v" / v, 4, seed=i + 50, mode="L", names="frame{:06d}.jpg")
    cls = lambda v: v.split("_")[1]  # noqa: E731
    (lists / "trainlist01.txt").write_text("".join(f"{cls(v)}/{v}.avi {1 + (cls(v) == 'Archery')}\n" for v in videos[:4]))
    (lists / "testlist01.txt").write_text("".join(f"{cls(v)}/{v}.avi\n" for v in videos[4:]))
    splits = load_dataset(f"ucf101:{root}", SMALL, DataConfig(val_fraction=0.5))
    inputs = splits.train[0][0]
    assert inputs["visual"].shape == (3, 3, 32, 32) and inputs["flow"].shape == (3, 2, 32, 32)
    assert 0.0 <= float(inputs["flow"].min()) and float(inputs["flow"].max()) <= 1.0
    assert splits.test.labels.tolist() == [0, 1]


# ---- image + text -----------------------------------------------------------------------------------
def write_food101(root):
    """The UPMC Food-101 layout: texts/<split>_titles.csv, images/<split>/<label>/<image>."""
    rows = []
    for split, n in (("train", 6), ("test", 2)):
        for i in range(n):
            label = ("apple_pie", "ramen")[i % 2]
            name = f"{label}_{split}{i}.jpg"
            write_jpgs(root / "images" / split / label, 1, seed=i, names=name.replace(".jpg", "") + ".jpg")
            rows.append((split, name, f"RT Best {label.replace('_', ' ')} recipe #{i} http://x.y/z", label))
    (root / "texts").mkdir()
    for split in ("train", "test"):
        lines = ["image_path,text,label"] + [f'{n},"{t}",{lab}' for s, n, t, lab in rows if s == split]
        (root / "texts" / f"{split}_titles.csv").write_text("\n".join(lines) + "\n")


def test_food101_layout_with_word_vocabulary(tmp_path, monkeypatch):
    root = tmp_path / "food"
    write_food101(root)
    splits = load_dataset(f"food101:{root}", {**SMALL, "max_length": 6}, DataConfig(val_fraction=0.34))
    assert splits.info.class_names == ("apple_pie", "ramen")
    spec = splits.info.modalities["text"]
    assert spec.kind == "tokens" and spec.shape == (6,) and spec.vocab_size > 2
    inputs = splits.test[0][0]
    assert inputs["visual"].shape == (3, 32, 32) and inputs["text"].dtype == torch.long
    assert int(inputs["text"][0]) > 1 and int(inputs["text"][-1]) == 0  # known word, then padding
    with pytest.raises(DataError, match="tokenizer folder '.*nowhere' does not exist"):
        load_dataset(f"food101:{root}", {**SMALL, "tokenizer": str(tmp_path / "nowhere")}, DataConfig())
    monkeypatch.setitem(sys.modules, "transformers", None)  # not installed: the error names the extra
    with pytest.raises(DataError, match=r"'transformers' package, part of the text extra: pip install 'poise\[text\]'"):
        load_dataset(f"food101:{root}", {**SMALL, "tokenizer": str(tmp_path)}, DataConfig())


def save_word_tokenizer(folder, words, pad_id=0):
    """A small Hugging Face tokenizer (WordLevel, lower-cased, BERT's [CLS] ... [SEP] template) saved
    with ``save_pretrained``, as a user's local BERT folder would be; ``pad_id`` places [PAD]."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers.processors import TemplateProcessing

    special = ["[UNK]", "[CLS]", "[SEP]"]
    specials = special[:pad_id] + ["[PAD]"] + special[pad_id:]
    vocab = {w: i for i, w in enumerate(specials + list(words))}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = tokenizers.normalizers.Lowercase()
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                cls_token="[CLS]", sep_token="[SEP]")
    fast.save_pretrained(str(folder))
    return vocab


def test_food101_and_mvsa_with_a_local_hugging_face_tokenizer(tmp_path):
    root = tmp_path / "food"
    write_food101(root)
    vocab = save_word_tokenizer(tmp_path / "bert", ["best", "apple", "pie", "ramen", "recipe"])
    splits = load_dataset(f"food101:{root}", {**SMALL, "max_length": 7, "tokenizer": str(tmp_path / "bert")},
                          DataConfig(val_fraction=0.34))
    assert splits.info.modalities["text"].vocab_size == len(vocab) == 9
    text = splits.test[0][0]["text"]  # "Best apple pie recipe 0" (cleaned: no RT, no '#', no link)
    assert text.tolist() == [vocab[w] for w in ("[CLS]", "best", "apple", "pie", "recipe", "[UNK]", "[SEP]")]
    short = load_dataset(f"food101:{root}", {**SMALL, "max_length": 4, "tokenizer": str(tmp_path / "bert")}, DataConfig())
    assert short.test[0][0]["text"].tolist() == [vocab["[CLS]"], vocab["best"], vocab["apple"], vocab["[SEP]"]]

    # a tokenizer that pads with id 2: padding becomes 0 (what the encoders mask) and its id 0
    # ([UNK] here) becomes 2
    mvsa = tmp_path / "mvsa"
    lines = ["ID\ttext,image"]
    for i in range(1, 11):
        write_jpgs(mvsa / "data", 1, seed=i, names=f"{i}.jpg")
        (mvsa / "data" / f"{i}.txt").write_text("good sunny day" if i % 2 else "bad")
        lines.append(f"{i}\t{('negative', 'positive')[i % 2]},neutral")
    (mvsa / "labelResultAll.txt").write_text("\n".join(lines) + "\n")
    vocab = save_word_tokenizer(tmp_path / "padded", ["good", "bad", "day"], pad_id=2)
    assert vocab["[PAD]"] == 2 and vocab["[UNK]"] == 0
    random = {"split": "random", "label_rule": "neutral_yields", "special_tokens": True}
    splits = load_dataset(f"mvsa:{mvsa}", {**SMALL, **random, "max_length": 6, "tokenizer": str(tmp_path / "padded")},
                          DataConfig(val_fraction=0.2))
    items = [splits.train[i] for i in range(len(splits.train))]
    good = next(x[0]["text"] for x in items if x[1] == 2)
    assert good.tolist() == [vocab["[CLS]"], vocab["good"], 2, vocab["day"], vocab["[SEP]"], 0]
    with pytest.raises(DataError, match="tokenizer folder .* cannot be loaded"):
        load_dataset(f"mvsa:{mvsa}", {**SMALL, **random, "tokenizer": str(tmp_path)}, DataConfig())


def test_mvsa_label_rule_and_listed_conflicts(tmp_path):
    root = tmp_path / "mvsa"
    pairs = ["positive,positive", "neutral,negative", "positive,neutral", "negative,negative", "positive,negative",
             "neutral,neutral"] * 3
    lines = ["ID\ttext,image"]
    for i, pair in enumerate(pairs, start=1):
        write_jpgs(root / "data", 1, seed=i, names=f"{i}.jpg")
        (root / "data" / f"{i}.txt").write_bytes(f"post number {i} caf\xe9".encode("latin-1"))
        lines.append(f"{i}\t{pair}")
    (root / "labelResultAll.txt").write_text("\n".join(lines) + "\n")
    splits = load_dataset(f"mvsa:{root}", {**SMALL, "test_fraction": 0.2, "split": "random", "label_rule": "neutral_yields"},
                          DataConfig(val_fraction=0.2))
    assert len(splits.train) + len(splits.val) + len(splits.test) == 15
    assert len(splits.notes["skipped"]) == 3 and "text label 'positive' and image label 'negative'" in splits.notes["skipped"][0]
    counts = np.bincount(np.concatenate([s.labels.numpy() for s in (splits.train, splits.val, splits.test)]), minlength=3)
    assert counts.tolist() == [6, 3, 6]  # negative, neutral, positive
    (root / "labelResultAll.txt").write_text("ID\ttext,image\n1\thappy,positive\n")
    with pytest.raises(DataError, match="labelResultAll.txt line 2: label 'happy' is not in the class list"):
        load_dataset(f"mvsa:{root}", SMALL, DataConfig())


# ---- feature sequences ------------------------------------------------------------------------------
def test_mosei_pickle_layout(tmp_path):
    path = tmp_path / "mosei_senti_data_noalign.pkl"
    write_feature_pickle(path, {"train": 12, "valid": 4, "test": 4})
    splits = load_dataset(f"mosei:{tmp_path}", {}, DataConfig())
    assert {m: s.shape for m, s in splits.info.modalities.items()} == {"audio": (6, 74), "visual": (6, 35), "text": (6, 300)}
    with open(path, "rb") as f:
        raw = pickle.load(f)
    assert splits.test.labels.tolist() == (raw["test"]["labels"][:, 0, 0] >= 0).astype(int).tolist()
    seven = load_dataset(f"mosei:{path}", {"classes": 7}, DataConfig())
    assert seven.info.num_classes == 7
    assert seven.test.labels.tolist() == (np.clip(np.round(raw["test"]["labels"][:, 0, 0]), -3, 3) + 3).astype(int).tolist()
    raw["train"]["audio"][0, 0, 0] = -np.inf
    with open(path, "wb") as f:
        pickle.dump(raw, f)
    assert float(load_dataset(f"mosei:{path}", {}, DataConfig()).train.inputs["audio"][0, 0, 0]) == 0.0


def test_feature_array_of_the_wrong_shape_and_iemocap_labels(tmp_path):
    bad = tmp_path / "bad.pkl"
    write_feature_pickle(bad, {"train": 4, "valid": 2, "test": 2}, dims=(74, 35, 200))
    with pytest.raises(DataError, match=r"split 'train' array 'text' has shape \(4, 6, 200\), expected \(4, T, 300\)"):
        load_dataset(f"mosei:{bad}", {}, DataConfig())
    iemocap = tmp_path / "iemocap_data.pkl"
    write_feature_pickle(iemocap, {"train": 8, "valid": 4, "test": 4}, labels="iemocap")
    splits = load_dataset(f"iemocap:{tmp_path}", {}, DataConfig())
    assert splits.info.class_names == ("neutral", "happy", "sad", "angry")
    assert splits.train.labels.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    with open(iemocap, "rb") as f:
        raw = pickle.load(f)
    raw["test"]["labels"][1, 2] = (0, 1)  # two positive emotions
    with open(iemocap, "wb") as f:
        pickle.dump(raw, f)
    with pytest.raises(DataError, match="split 'test': sample 1 has 2 positive emotions, exactly one expected"):
        load_dataset(f"iemocap:{tmp_path}", {}, DataConfig())


# ---- presets ----------------------------------------------------------------------------------------
def test_every_shipped_preset_validates_with_its_methods(cremad_root):
    from poise.bench import run_config
    from poise.config import PRESET_DIR, load_config_file
    from poise.methods import make_method
    from poise.train import Trainer

    presets = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    assert {"cremad_ogm_ge", "cremad_ogm_ge_tpami", "vggsound_ogm_ge", "cremad_mla", "cremad_gblend"} <= set(presets)
    spec = f"cremad:{cremad_root}"
    splits = load_dataset(spec, SMALL, DataConfig(val_fraction=0.5))
    for name in presets:
        cfg = run_config(spec, load_config_file(name), {"trainer": {"progress": False, "tensorboard": False}})
        assert cfg.method, f"preset {name} configures no method"
        for method_name, options in cfg.method.items():
            Trainer(splits, make_method(method_name, options), cfg, seed=0, method_name=method_name)
    cfg = run_config(spec, load_config_file("cremad_ogm_ge"), {})
    assert (cfg.trainer.lr, cfg.trainer.step_size, cfg.trainer.batch_size, cfg.trainer.epochs) == (0.001, 70, 64, 100)
    assert cfg.method["ogm_ge"]["alpha"] == 0.8 and cfg.model.fusion == "concat"
