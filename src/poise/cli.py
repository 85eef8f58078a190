"""``poise train | bench | report | pretrain | list``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from poise.errors import PoiseError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="avdigits, synthetic, npz:PATH, ...")
    p.add_argument("--config", help="YAML file or the name of a shipped preset")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. trainer.epochs=5 or method.ogm_ge.alpha=0.5 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poise", description="Balanced multimodal learning.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one method with one seed")
    _common(p)
    p.add_argument("--method", required=True, help="joint, unimodal:<modality>, ogm_ge, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="run folder (result.json, metrics.jsonl, tensorboard/, best.pt)")
    p.add_argument("--init", help="folder written by 'poise pretrain': start from those encoders")

    p = sub.add_parser("bench", help="several methods x seeds, with a report and plots")
    _common(p)
    p.add_argument("--methods", default="all", help="comma list (joint,unimodal:audio,ogm_ge) or 'all'")
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds")
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=1, help="parallel runs (each single-threaded when > 1)")

    p = sub.add_parser("report", help="rewrite report.md and plots from a bench folder's results.json")
    p.add_argument("dir")

    p = sub.add_parser("pretrain", help="self-supervised pre-training of every encoder (no labels)")
    _common(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)

    p = sub.add_parser("prepare", help="decode a dataset's videos and audio once into the cache its loader reads")
    p.add_argument("dataset", help="cremad, kinetics_sounds, ave or vggsound")
    p.add_argument("--raw", required=True, help="folder with the split lists and the raw videos / audio")
    p.add_argument("--out", required=True, help="prepared folder, then used as --dataset NAME:OUT")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel worker processes")

    sub.add_parser("list", help="registered datasets, methods, fusions and encoders")
    return parser


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise PoiseError(f"--seeds expects comma-separated integers, got '{text}'") from None
    if not seeds:
        raise PoiseError("--seeds is empty")
    return seeds


def _config(args):
    from poise.bench import run_config
    from poise.config import load_config_file, parse_set

    file_layer = load_config_file(args.config) if args.config else {}
    return run_config(args.dataset, file_layer, parse_set(args.sets))


def cmd_train(args) -> int:
    from poise.bench import train_one
    from poise.train.trainer import atomic_write_text

    cfg = _config(args)
    from poise.bench import expand_methods, splits_for

    expand_methods(args.method, tuple(splits_for(args.dataset, cfg).info.modalities))
    out = Path(args.out)
    run = train_one(args.dataset, args.method, cfg.model_dump(), args.seed, str(out), init_dir=args.init)
    atomic_write_text(json.dumps({"dataset": args.dataset, **run}, indent=1), out / "result.json")
    t = run["test"]
    print(f"{args.method} seed {args.seed}: test accuracy {t['accuracy']:.4f}, macro-F1 {t['macro_f1']:.4f}, "
          f"best epoch {run['best_epoch']}")
    for m in t["unimodal_accuracy"]:
        probe = t["probe_accuracy"].get(m)
        print(f"  {m}: head {t['unimodal_accuracy'][m]:.4f}" + (f", probe {probe:.4f}" if probe is not None else ""))
    print(f"written to {out}")
    return 0


def cmd_bench(args) -> int:
    from poise.bench import expand_methods, run_bench, splits_for
    from poise.eval.report import summary_table, write_report

    cfg = _config(args)
    seeds = _parse_seeds(args.seeds)
    methods = expand_methods(args.methods, tuple(splits_for(args.dataset, cfg).info.modalities))
    if args.workers < 1:
        raise PoiseError(f"--workers must be at least 1, got {args.workers}")
    out = Path(args.out)
    print(f"bench on {args.dataset}: {len(methods)} methods x {len(seeds)} seeds -> {out}", flush=True)
    results = run_bench(args.dataset, methods, seeds, cfg, out, workers=args.workers,
                        log=lambda line: print(line, flush=True))
    write_report(results, out)
    print()
    print(summary_table(results))
    print(f"\nreport: {out / 'report.md'}")
    return 0


def cmd_report(args) -> int:
    from poise.eval.report import summary_table, write_report

    path = Path(args.dir) / "results.json"
    if not path.is_file():
        raise PoiseError(f"'{path}' does not exist: give a folder written by 'poise bench'")
    try:
        results = json.loads(path.read_text())
        results["dataset"], results["runs"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise PoiseError(f"'{path}' is not a poise results file: {e}") from None
    write_report(results, Path(args.dir))
    print(summary_table(results))
    return 0


def cmd_pretrain(args) -> int:
    from poise.bench import splits_for
    from poise.train.pretrain import run_pretrain

    cfg = _config(args)
    summary = run_pretrain(splits_for(args.dataset, cfg), cfg, Path(args.out), args.seed)
    print(json.dumps(summary, indent=1))
    return 0


def cmd_prepare(args) -> int:
    from poise.data.prepare import run_prepare

    if args.workers < 1:
        raise PoiseError(f"--workers must be at least 1, got {args.workers}")
    summary = run_prepare(args.dataset, Path(args.raw), Path(args.out), workers=args.workers, progress=sys.stderr.isatty())
    print(f"{args.dataset}: {summary['prepared']} clips prepared, {summary['already_prepared']} already done, "
          f"{summary['skipped']} skipped (listed in {summary['report']})")
    return 0


def cmd_list(args) -> int:
    from poise.data.registry import DATASETS
    from poise.methods.registry import METHODS
    from poise.models.encoders import ENCODERS
    from poise.models.fusion import FUSIONS

    from poise.config import config_keys

    for title, reg in (("datasets", DATASETS), ("methods", METHODS), ("fusions", FUSIONS), ("encoders", ENCODERS)):
        print(f"{title}: {', '.join(reg)}")
    print("config keys (--set KEY=VALUE):")
    for key, default, description in config_keys():
        shown = key if "<" in key else f"{key} = {default!r}"
        print(f"  {shown}  {description}")
    return 0


COMMANDS = {"train": cmd_train, "bench": cmd_bench, "report": cmd_report, "pretrain": cmd_pretrain, "list": cmd_list,
            "prepare": cmd_prepare}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except PoiseError as e:
        print(f"poise: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("poise: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
