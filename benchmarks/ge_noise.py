"""What OGM-GE's noise costs per training step at CREMA-D size, and what drawing normal numbers costs.

    python benchmarks/ge_noise.py [--threads 1] [--rounds 15]

The gradients are those of the tensors OGM-GE modulates (``select_modulated_parameters``, ``weights``) in
the two ResNet-18 encoders of the CREMA-D setting (1 x 257 x 188 spectrogram, 3 x 224 x 224 frame),
filled with random values. Timed, in one process, the variants taking turns round by round:

- ``modulate_gradients(noise=True)``: poise's whole GE step (stds, scaling, noise);
- ``released form``: the released code's per-tensor ``g * k + zeros_like(g).normal_(0, g.std() + 1e-8)``;
- the samplers alone, per number: torch's ``normal_`` and ``uniform_`` (the uniforms that its Box-Muller
  transform consumes), ``random_`` bits, and numpy's float32 uniforms and normals.

With one thread the clock is the process's CPU time; with more, the wall clock. Reported: medians over
rounds (min-max).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from poise.functional.ogm import modulate_gradients, select_modulated_parameters
from poise.models.model import build_model
from trainer_overhead import CREMAD_INFO, CREMAD_MODEL

PIECE = 1 << 18


def cremad_gradients() -> list[list[torch.Tensor]]:
    torch.manual_seed(0)
    model = build_model(CREMAD_INFO, tuple(CREMAD_INFO.modalities), "concat", **CREMAD_MODEL)
    groups = [select_modulated_parameters(model.encoders[m], "weights") for m in ("audio", "visual")]
    g = torch.Generator().manual_seed(1)
    for group in groups:
        for p in group:
            p.grad = torch.randn(p.shape, generator=g) * 1e-3
    return groups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    groups = cremad_gradients()
    originals = [[p.grad.clone() for p in group] for group in groups]
    numbers = sum(p.numel() for group in groups for p in group)
    coefficients = torch.tensor([0.6, 1.0])

    def restore() -> None:
        for group, saved in zip(groups, originals):
            for p, g in zip(group, saved):
                p.grad.copy_(g)

    def poise_step() -> None:
        modulate_gradients(groups, coefficients, noise=True, generator=torch.Generator().manual_seed(0))

    def released_step() -> None:
        for group, k in zip(groups, coefficients.tolist()):
            for p in group:
                p.grad = p.grad * k + torch.zeros_like(p.grad).normal_(0, p.grad.std().item() + 1e-8)

    buffer = torch.empty(PIECE)
    bits = torch.empty(PIECE, dtype=torch.int64)
    out = np.empty(PIECE, dtype=np.float32)
    gen = torch.Generator().manual_seed(0)
    rng = np.random.Generator(np.random.PCG64(0))
    samplers = {
        "torch normal_": lambda: buffer.normal_(generator=gen),
        "torch uniform_": lambda: buffer.uniform_(generator=gen),
        "torch random_ (int64)": lambda: bits.random_(generator=gen),
        "numpy PCG64 random float32": lambda: rng.random(PIECE, dtype=np.float32, out=out),
        "numpy PCG64 standard_normal float32": lambda: rng.standard_normal(PIECE, dtype=np.float32, out=out),
    }
    times: dict[str, list[float]] = {name: [] for name in ("poise GE step", "released form", *samplers)}
    reps = max(1, numbers // PIECE // 4)
    for _ in range(args.rounds):
        for name, step in (("poise GE step", poise_step), ("released form", released_step)):
            restore()
            start = clock()
            step()
            times[name].append(clock() - start)
        for name, draw in samplers.items():
            start = clock()
            for _ in range(reps):
                draw()
            times[name].append((clock() - start) / (reps * PIECE))

    print(f"{numbers / 1e6:.1f} M modulated weights, {args.threads} thread(s), "
          f"{'CPU time' if args.threads == 1 else 'wall clock'}, {args.rounds} rounds: median (min-max)")
    print("| measurement | median | min-max |\n|---|---|---|")
    for name, values in times.items():
        if name in samplers:
            values = [v * 1e9 for v in values]
            unit = "ns per number"
        else:
            values = [v * 1e3 for v in values]
            unit = "ms per step"
        print(f"| {name} | {statistics.median(values):.2f} {unit} | {min(values):.2f}-{max(values):.2f} |")
    per_number = statistics.median(times["torch normal_"])
    print(f"drawing {numbers / 1e6:.1f} M numbers with torch's normal_ alone: {per_number * numbers * 1e3:.1f} ms per step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
