"""Does data loading keep up with training on this machine's CPU cores?

Two measurements, each printing ratios (above 1: loading is faster than training consumes):

- ``avdigits`` at its defaults (``joint``, batch 128, the tiny MLP / conv encoders): the time to
  iterate the training loader alone (what the trainer builds, ``trainer.num_workers`` 0) against a
  whole training epoch of ``joint`` (loading included), median of ``--rounds`` epochs.
- CREMA-D-sized inputs (``cremad`` from a ``poise prepare`` cache: 257 x 188 spectrogram .npy plus
  one 480 x 360 jpg frame per clip, RandomResizedCrop to 224): samples per second of the training
  loader (batch ``--batch``, 0 and 2 worker processes) against samples per second of a ``joint``
  training step of the dataset's default model (two ResNet-18 from scratch, concat fusion, SGD) on
  the CPU, timed on a batch already in memory; then the same training fed by the 2-worker loader, to
  see what the workers cost the step when they share the cores with it.

    .venv/bin/python benchmarks/loader_throughput.py [--part avdigits|cremad|both] [--threads 2]

avdigits and the loaders run with one torch thread (``--threads`` is the ResNet-18 step's): tiny
tensor operations gain nothing from a second thread, and on a busy machine an intra-op thread that
waits for a descheduled sibling can make a 0-worker loader's ``torch.stack`` many times slower.
Wall-clock times; the cores are shared with whatever else runs, so read ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def avdigits(rounds: int) -> None:
    from poise.bench import run_config, splits_for
    from poise.config import parse_set
    from poise.methods.registry import make_method
    from poise.train.trainer import Trainer

    cfg = run_config("avdigits", {}, parse_set(["trainer.progress=false", "trainer.tensorboard=false"]))
    splits = splits_for("avdigits", cfg)
    trainer = Trainer(splits, make_method("joint", cfg.method.get("joint", {})), cfg, seed=0, method_name="joint")
    trainer.setup()
    trainer.train_epoch(0)  # warm-up: allocations, first-touch
    loading, epochs = [], []
    for r in range(1, rounds + 1):
        start = time.perf_counter()
        for _ in trainer.train_loader:
            pass
        loading.append(time.perf_counter() - start)
        start = time.perf_counter()
        trainer.train_epoch(r)
        epochs.append(time.perf_counter() - start)
    n, steps = len(splits.train), len(trainer.train_loader)
    load, epoch = statistics.median(loading), statistics.median(epochs)
    print(f"avdigits: {n} training samples, batch {cfg.trainer.batch_size} ({steps} steps), "
          f"num_workers {cfg.trainer.num_workers}, {torch.get_num_threads()} torch thread(s), median of {rounds} epochs")
    print(f"  loader alone      {1000 * load:8.1f} ms per epoch  ({n / load:9.0f} samples/s)")
    print(f"  joint epoch       {1000 * epoch:8.1f} ms per epoch  ({n / epoch:9.0f} samples/s, loading included)")
    print(f"  loading is {100 * load / epoch:.1f} % of a training epoch; the loader delivers "
          f"{epoch / load:.1f}x the samples per second that training consumes")


def write_prepared_cremad(root: Path, clips: int) -> None:
    """A prepared CREMA-D folder as ``poise prepare cremad`` writes it (spectrogram/<clip>.npy,
    Image-01-FPS/<clip>/00001.jpg .. 00003.jpg at the distributed 480 x 360, train.csv / test.csv)."""
    from PIL import Image

    from poise.data.audiovisual import CREMAD_CLASSES
    from poise.data.media import ClipSpectrogram

    rng = np.random.default_rng(0)
    names = [f"10{i:02d}_IEO_{CREMAD_CLASSES[i % 6]}_XX" for i in range(clips)]
    (root / "spectrogram").mkdir(parents=True)
    features = ClipSpectrogram()
    for i, clip in enumerate(names):
        np.save(root / "spectrogram" / f"{clip}.npy", features.cache_array((0.1 * rng.standard_normal(40000)).astype(np.float32)))
        folder = root / "Image-01-FPS" / clip
        folder.mkdir(parents=True)
        base = rng.integers(0, 255, (45, 60, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)  # 480 x 360, jpeg-like content
        for k in range(3):
            Image.fromarray(np.roll(base, 5 * k, axis=1)).save(folder / f"{k + 1:05d}.jpg", quality=95)
    (root / "train.csv").write_text("".join(f"{c},{c.split('_')[2]}\n" for c in names[6:]))
    (root / "test.csv").write_text("".join(f"{c},{c.split('_')[2]}\n" for c in names[:6]))


def _forever(loader):
    while True:
        yield from loader


def loader_rate(dataset, batch: int, workers: int, passes: int) -> float:
    from torch.utils.data import DataLoader

    from poise.data.batch import collate

    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=collate,
                        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))
    for _ in loader:  # warm-up pass (worker start-up, page cache)
        pass
    best = float("inf")
    for _ in range(passes):  # best of `passes`
        start = time.perf_counter()
        for _ in loader:
            pass
        best = min(best, time.perf_counter() - start)
    return len(dataset) / best


def cremad(clips: int, batch: int, steps: int, passes: int, threads: int) -> None:
    from torch.utils.data import DataLoader

    from poise.bench import run_config
    from poise.data.batch import collate
    from poise.config import DataConfig, parse_set
    from poise.data import load_dataset
    from poise.methods.registry import make_method
    from poise.train.trainer import Trainer

    work = Path(tempfile.mkdtemp(prefix="poise_loader_throughput_"))
    try:
        write_prepared_cremad(work / "cremad", clips)
        spec = f"cremad:{work / 'cremad'}"
        splits = load_dataset(spec, {}, DataConfig(val_fraction=0.1))
        train = splits.train
        torch.set_num_threads(1)
        rates = {w: loader_rate(train, batch, w, passes) for w in (0, 2)}
        torch.set_num_threads(threads)

        cfg = run_config(spec, {}, parse_set(["trainer.progress=false", "trainer.tensorboard=false",
                                              f"trainer.batch_size={batch}"]))
        trainer = Trainer(splits, make_method("joint", {}), cfg, seed=0, method_name="joint")
        model = trainer.build_model()
        optimizer = trainer.build_optimizer(model.parameters())
        batch_items = collate([train[i] for i in range(batch)])

        def step(b) -> None:
            optimizer.zero_grad(set_to_none=True)
            out = model(b)
            torch.nn.functional.cross_entropy(out.logits, b.labels).backward()
            optimizer.step()

        loader = DataLoader(train, batch_size=batch, shuffle=True, num_workers=2, collate_fn=collate, drop_last=True,
                            persistent_workers=True, generator=torch.Generator().manual_seed(0))
        fed = iter(_forever(loader))
        step(next(fed))  # warm-up, and the workers' start-up
        # alternate a step on the batch in memory with a step that takes its batch from the loader
        # (the workers prefetch while the step runs); best of `steps` each, as timeit does
        alone, with_loader = [], []
        for _ in range(steps):
            start = time.perf_counter()
            step(batch_items)
            alone.append(time.perf_counter() - start)
            start = time.perf_counter()
            step(next(fed))
            with_loader.append(time.perf_counter() - start)
        step_time, fed_time = min(alone), min(with_loader)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    consumed = batch / step_time
    print(f"cremad-sized: {len(train)} training clips (257 x 188 spectrogram, 1 frame 480 x 360 -> 224), batch {batch}")
    for w, rate in rates.items():
        print(f"  loader, {w} workers   {rate:8.1f} samples/s  = {rate / consumed:6.1f}x what training consumes")
    print(f"  joint ResNet-18 step  {1000 * step_time:8.1f} ms ({consumed:.1f} samples/s), batch already in memory, "
          f"{threads} torch thread(s), best of {steps}")
    print(f"  the same step taking its batch from the 2-worker loader: {1000 * fed_time:.1f} ms "
          f"({fed_time / step_time:.2f}x the step alone)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("avdigits", "cremad", "both"), default="both")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the ResNet-18 training step")
    parser.add_argument("--rounds", type=int, default=5, help="avdigits: timed epochs")
    parser.add_argument("--clips", type=int, default=70, help="cremad: prepared clips written")
    parser.add_argument("--batch", type=int, default=8, help="cremad: batch size")
    parser.add_argument("--steps", type=int, default=4, help="cremad: timed training steps of each kind (the best is kept)")
    parser.add_argument("--passes", type=int, default=3, help="cremad: timed loader passes (the best is kept)")
    args = parser.parse_args(argv)
    if args.part in ("avdigits", "both"):
        torch.set_num_threads(1)
        avdigits(args.rounds)
    if args.part in ("cremad", "both"):
        cremad(args.clips, args.batch, args.steps, args.passes, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
