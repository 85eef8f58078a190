"""Regenerate ``src/poise/data/assets/avdigits_audio.npz``: the spoken-digit half of the ``avdigits``
dataset.

Every voice (an espeak-ng English accent combined with a voice variant) says the ten digit names
"zero" .. "nine" once, at a speaking rate and pitch drawn per utterance from a fixed seed. Each
waveform is resampled to 16 kHz, trimmed of silence, placed at a seeded onset inside a window of
just under one second, and turned into a 32-band log-mel spectrogram of 32 frames (dB relative to
the utterance's peak, floored at -80 dB), stored as uint8 with its scale and offset.

Needs espeak-ng on the PATH and the optional ``gen`` extra (librosa, soundfile):

    .venv/bin/pip install -c constraints.txt -e '.[gen]'
    .venv/bin/python scripts/make_avdigits_audio.py

The output is byte-for-byte the same for the same espeak-ng, librosa and soxr builds (espeak-ng 1.51,
librosa 0.11.0, soxr 1.1.0 made the committed file); another espeak-ng version may pronounce
slightly differently.
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import zipfile
from multiprocessing import Pool
from pathlib import Path

import librosa
import numpy as np
import soundfile

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

#: four clearly distinct English accents of espeak-ng's built-in (non-mbrola) voice set
ACCENTS = ("en", "en-US", "en-GB-scotland", "en-029")

#: espeak-ng voice variants (files in espeak-ng-data/voices/!v); a missing variant would silently fall
#: back to the plain accent, so the script checks that every one exists before synthesising
VARIANTS = (
    "adam", "Alex", "Alicia", "Andrea", "Andy", "anika", "anikaRobot", "Annie", "announcer", "antonio",
    "AnxiousAndy", "aunty", "belinda", "benjamin", "boris", "caleb", "croak", "david", "Demonic", "Denis",
    "Diogo", "ed", "edward", "edward2", "f1", "f2", "f3", "f4", "f5", "fast",
    "Gene", "Gene2", "grandma", "grandpa", "gustave", "Henrique", "Hugo", "iven", "iven2", "iven3",
    "iven4", "Jacky", "john", "kaukovalta", "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "klatt6",
    "Lee", "linda", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8",
    "marcelo", "Marco", "Mario", "max", "Michael", "michel", "miguel", "Mike", "Nguyen", "norbert",
    "pablo", "paul", "pedro", "quincy", "RicishayMax", "RicishayMax2", "RicishayMax3", "rob", "robert", "robosoft",
    "robosoft2", "robosoft3", "robosoft4", "robosoft5", "robosoft6", "robosoft7", "robosoft8", "sandro", "shelby", "steph",
    "steph2", "steph3", "Storm", "travis", "Tweaky", "UniRobot", "victor", "whisper", "whisperf", "zac",
)

SPEEDS_WPM = (120, 145, 170, 195, 220)  # espeak-ng -s
PITCHES = (25, 40, 55, 70, 85)  # espeak-ng -p (0-99)
SEED = 20_24

SAMPLE_RATE = 16_000
N_FFT = 1024
HOP_LENGTH = 500
N_MELS = 32
FRAMES = 32
WINDOW_SAMPLES = (FRAMES - 1) * HOP_LENGTH  # with centred frames this gives exactly FRAMES frames
FMIN, FMAX = 50.0, 8000.0
TRIM_TOP_DB = 40.0
FLOOR_DB = 80.0

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "poise" / "data" / "assets" / "avdigits_audio.npz"


def espeak_version() -> str:
    out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True).stdout
    return out.split("Data at")[0].strip()


def variants_dir() -> Path:
    out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True).stdout
    return Path(out.split("Data at:")[1].strip()) / "voices" / "!v"


def synthesis_plan() -> list[tuple[int, int, str, int, int, int]]:
    """(voice id, digit, voice name, speed, pitch, onset seed) for every utterance, in file order."""
    rng = np.random.default_rng(SEED)
    plan = []
    voice_names = [f"{a}+{v}" for a in ACCENTS for v in VARIANTS]
    for voice_id, voice in enumerate(voice_names):
        for digit in range(len(DIGIT_WORDS)):
            speed = int(rng.choice(SPEEDS_WPM))
            pitch = int(rng.choice(PITCHES))
            onset_seed = int(rng.integers(2**31))
            plan.append((voice_id, digit, voice, speed, pitch, onset_seed))
    return plan


def synthesise(item: tuple[int, int, str, int, int, int]) -> tuple[np.ndarray, int, int]:
    """One utterance -> (uint8 log-mel (N_MELS, FRAMES), onset in samples, trimmed length in samples)."""
    _, digit, voice, speed, pitch, onset_seed = item
    wav = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", DIGIT_WORDS[digit]],
        capture_output=True, check=True,
    ).stdout
    audio, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    if audio.ndim > 1:
        audio = audio.mean(axis=1)
    audio = librosa.resample(audio, orig_sr=rate, target_sr=SAMPLE_RATE, res_type="soxr_hq")
    audio, _ = librosa.effects.trim(audio, top_db=TRIM_TOP_DB)
    audio = audio[:WINDOW_SAMPLES]
    slack = WINDOW_SAMPLES - len(audio)
    onset = int(np.random.default_rng(onset_seed).integers(slack + 1))
    window = np.zeros(WINDOW_SAMPLES, dtype=np.float32)
    window[onset:onset + len(audio)] = audio
    mel = librosa.feature.melspectrogram(
        y=window, sr=SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP_LENGTH, n_mels=N_MELS, fmin=FMIN, fmax=FMAX,
    )
    db = librosa.power_to_db(mel, ref=np.max, top_db=FLOOR_DB)  # in [-FLOOR_DB, 0]
    assert db.shape == (N_MELS, FRAMES), db.shape
    quantised = np.clip(np.round((db + FLOOR_DB) * (255.0 / FLOOR_DB)), 0, 255).astype(np.uint8)
    return quantised, onset, len(audio)


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Like ``np.savez_compressed`` (and loadable by ``np.load``), but with fixed zip timestamps, so that
    regenerating gives the same bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    if shutil.which("espeak-ng") is None:
        print("espeak-ng is not on the PATH; install it (e.g. apt-get install espeak-ng)", file=sys.stderr)
        return 2
    missing = [v for v in VARIANTS if not (variants_dir() / v).is_file()]
    if missing:
        print(f"espeak-ng lacks the voice variants {missing}", file=sys.stderr)
        return 2
    plan = synthesis_plan()
    with Pool(args.workers) as pool:
        results = pool.map(synthesise, plan, chunksize=16)
    voice_names = [f"{a}+{v}" for a in ACCENTS for v in VARIANTS]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_npz(
        args.out,
        log_mel=np.stack([r[0] for r in results]),
        db_scale=np.float32(FLOOR_DB / 255.0),
        db_offset=np.float32(-FLOOR_DB),
        labels=np.array([p[1] for p in plan], dtype=np.int8),
        voice=np.array([p[0] for p in plan], dtype=np.int16),
        voice_names=np.array(voice_names),
        speed_wpm=np.array([p[3] for p in plan], dtype=np.int16),
        pitch=np.array([p[4] for p in plan], dtype=np.int16),
        onset_samples=np.array([r[1] for r in results], dtype=np.int32),
        speech_samples=np.array([r[2] for r in results], dtype=np.int32),
        digit_words=np.array(DIGIT_WORDS),
        espeak_version=np.array(espeak_version()),
        sample_rate=np.int32(SAMPLE_RATE),
        n_fft=np.int32(N_FFT),
        hop_length=np.int32(HOP_LENGTH),
        n_mels=np.int32(N_MELS),
        fmin=np.float32(FMIN),
        fmax=np.float32(FMAX),
        trim_top_db=np.float32(TRIM_TOP_DB),
        seed=np.int64(SEED),
    )
    size = args.out.stat().st_size
    print(f"wrote {args.out}: {len(plan)} utterances, {len(voice_names)} voices, {size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
