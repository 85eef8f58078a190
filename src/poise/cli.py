"""``poise train | bench | report | pretrain | list | tune``."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import textwrap
from pathlib import Path

from poise.errors import ConfigError, PoiseError, json_problem


def _common(p: argparse.ArgumentParser, dataset_required: bool = True) -> None:
    p.add_argument("--dataset", required=dataset_required, help="avdigits, synthetic, npz:PATH, ...")
    p.add_argument("--config", help="YAML file or the name of a shipped preset")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. trainer.epochs=5 or method.ogm_ge.alpha=0.5 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poise", description="Balanced multimodal learning.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one method with one seed (under torchrun: on every process it starts)")
    _common(p, dataset_required=False)
    p.add_argument("--method", help="joint, unimodal:<modality>, ogm_ge, ...")
    p.add_argument("--seed", type=int, default=None, help="run seed (default 0)")
    p.add_argument("--out", help="run folder (run.json, checkpoint.pt, result.json, metrics.jsonl, tensorboard/, best.pt)")
    p.add_argument("--init", help="folder written by 'poise pretrain': start from those encoders")
    p.add_argument("--resume", metavar="DIR",
                   help="continue the run in DIR from its checkpoint.pt, with the dataset, method, seed and "
                        "configuration stored in DIR/run.json")
    p.add_argument("--overwrite", action="store_true",
                   help="--out holds an earlier run: delete its files (TensorBoard events included) and start anew")

    p = sub.add_parser("bench", help="several methods x seeds, with a report and plots")
    _common(p)
    p.add_argument("--methods", default="all", help="comma list (joint,unimodal:audio,ogm_ge) or 'all'")
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds")
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=1, help="parallel runs (each with trainer.threads CPU threads, default 1)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted bench in --out: keep its finished runs, continue the others from "
                        "their checkpoints")
    p.add_argument("--overwrite", action="store_true",
                   help="--out holds an earlier bench: delete its results, report, plots and run folders and start anew")

    p = sub.add_parser("eval", help="score a finished run's best checkpoint under missing modalities")
    p.add_argument("dir", help="run folder (poise train --out), or a bench folder: every run, with a summary over seeds")
    p.add_argument("--split", default="test", help="test or val")
    p.add_argument("--missing-rates", default="", metavar="R,R,...",
                   help="also score with each modality of every sample missing with these probabilities")
    p.add_argument("--no-drop-each", dest="drop_each", action="store_false",
                   help="leave out the scores with one modality missing from every sample")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="data.*, dataset.*, trainer.device, trainer.batch_size or trainer.num_workers (repeatable)")

    p = sub.add_parser("report", help="rewrite report.md and plots from a bench folder's results.json")
    p.add_argument("dir")

    p = sub.add_parser("pretrain", help="self-supervised pre-training of every encoder (no labels)")
    _common(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--objective", choices=("contrastive", "augment", "jigsaw"), default="contrastive",
                   help="contrastive: cross-modal InfoNCE between the modalities of a sample; augment: NT-Xent between two "
                        "views; jigsaw: which of 64 permutations shuffled the 3 x 3 tiles (image-like modalities)")
    p.add_argument("--epochs", type=int, default=None, help="pre-training epochs (default: trainer.epochs)")
    p.add_argument("--temperature", type=float, default=0.1, help="softmax temperature of the objective")

    p = sub.add_parser("prepare", help="decode a dataset's videos and audio once into the cache its loader reads")
    p.add_argument("dataset", help="cremad, kinetics_sounds, ave, vggsound, ucf101, food101 or mvsa")
    p.add_argument("--raw", required=True, help="folder with the split lists and the raw videos / audio")
    p.add_argument("--out", required=True, help="prepared folder, then used as --dataset NAME:OUT")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel worker processes")
    p.add_argument("--flow", choices=("tvl1", "farneback"), default=None,
                   help="ucf101: optical flow algorithm (default: tvl1 when OpenCV has its contrib modules, else farneback)")

    sub.add_parser("list", help="registered datasets, methods, fusions and encoders")

    p = sub.add_parser("tune", help="the same number of trials per method, chosen on validation, then scored on test")
    _common(p)
    p.add_argument("--methods", required=True, help="comma list of method names (joint,ogm_ge,mla)")
    p.add_argument("--trials", type=int, required=True, help="trials per method (every method the same)")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the final runs of the default and the chosen configuration")
    p.add_argument("--out", required=True, help="folder: study.db, results.json, report.md, plots, default/, tuned/")
    p.add_argument("--workers", type=int, default=1, help="parallel trials (and final runs) on this machine")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="database of the studies, any URL Optuna takes (default: sqlite:///OUT/study.db); "
                        "machines given the same URL share the studies")
    p.add_argument("--resume", action="store_true", help="continue a stopped tune in --out (its studies and final runs)")
    p.add_argument("--overwrite", action="store_true", help="--out holds an earlier tune: delete it and start anew")
    return parser


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise PoiseError(f"--seeds expects comma-separated integers, got '{text}'") from None
    if not seeds:
        raise PoiseError("--seeds is empty")
    for seed in seeds:
        _check_seed(seed, "--seeds")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:  # a repeated seed is the same run twice: it would shrink the spread and share a run folder
        raise PoiseError(f"--seeds lists seed {', '.join(map(str, repeated))} more than once ('{text}'); "
                         "give each seed once")
    return seeds


def _check_seed(seed: int, flag: str = "--seed") -> None:
    if not 0 <= seed < 2**32:
        raise PoiseError(f"{flag} must be an integer from 0 to 2**32 - 1, got {seed}")


def _prepare_out(out: Path, overwrite: bool, resume: bool, what: str, outputs: tuple[str, ...],
                 clear: bool = True) -> None:
    """Refuse an ``--out`` that cannot hold the outputs, or that holds earlier ones (unless ``--resume`` or
    ``--overwrite``); with ``--overwrite`` and ``clear`` delete those."""
    from poise.train.run_files import check_out_dir, clear_run_folder

    check_out_dir(out)
    if resume and overwrite:
        raise PoiseError("--resume continues the earlier outputs and --overwrite deletes them; give one of them")
    earlier = [name for name in outputs if (out / name).exists()]
    if earlier and not (resume or overwrite):
        raise PoiseError(f"--out '{out}' already holds {what} ({', '.join(earlier[:3])}); give --resume to continue it, "
                         "--overwrite to replace it, or another --out")
    if earlier and overwrite and clear:
        clear_run_folder(out, outputs)


def _config(args):
    from poise.bench import run_config
    from poise.config import load_config_file, parse_set

    file_layer = load_config_file(args.config) if args.config else {}
    return run_config(args.dataset, file_layer, parse_set(args.sets))




def _stored_run(args) -> dict:
    """The dataset, method, seed, init folder and configuration of the run that ``--resume DIR`` continues;
    refused when anything given on the command line differs from them."""
    from poise.bench import RUN_FILE
    from poise.config import RunConfig
    from poise.train.checkpoint import CHECKPOINT_FILE, first_difference

    run_dir = Path(args.resume)
    if args.out is not None and Path(args.out).resolve() != run_dir.resolve():
        raise PoiseError(f"--resume {run_dir} continues the run in that folder; leave out --out (got '{args.out}')")
    path = run_dir / RUN_FILE
    if not path.is_file():
        raise PoiseError(f"cannot resume: '{path}' does not exist; --resume takes a run folder written by 'poise train'")
    try:
        stored = json.loads(path.read_text())
        RunConfig(**stored["config"])
        stored["dataset"], stored["method"], stored["seed"]
    except Exception as err:
        raise PoiseError(f"cannot resume: '{path}' is not a poise run description ({err})") from None
    given = {"--dataset": args.dataset, "--method": args.method, "--seed": args.seed, "--init": args.init}
    kept = {"--dataset": stored["dataset"], "--method": stored["method"], "--seed": stored["seed"],
            "--init": stored.get("init")}
    for flag, value in given.items():
        if value is not None and value != kept[flag]:
            raise PoiseError(f"cannot resume: the run in '{run_dir}' was started with {flag} {kept[flag]}, not {value}; "
                             f"--resume takes the run's settings from '{path}' (leave {flag} out)")
    if args.config or args.sets:
        from poise.bench import run_config
        from poise.config import load_config_file, parse_set

        file_layer = load_config_file(args.config) if args.config else {}
        cfg = run_config(stored["dataset"], file_layer, parse_set(args.sets))
        differs = first_difference(stored["config"], cfg.model_dump())
        if differs is not None:
            raise PoiseError(f"cannot resume: the configuration given differs from the run's own at '{differs}'; "
                             f"--resume takes the configuration from '{path}' (leave out --config and --set)")
    if not (run_dir / CHECKPOINT_FILE).is_file():
        raise PoiseError(f"cannot resume: '{run_dir / CHECKPOINT_FILE}' does not exist (the run stopped before its first "
                         "checkpoint, or trainer.checkpoint was false); start the run again without --resume")
    return stored


def cmd_train(args) -> int:
    from poise.bench import check_method_names, expand_methods, method_options, resolve_method, splits_for, train_one
    from poise.config import RunConfig
    from poise.methods.registry import make_method
    from poise.train.distributed import is_main_process, shutdown
    from poise.train.run_files import RUN_OUTPUTS
    from poise.train.trainer import Trainer

    if args.resume:
        stored = _stored_run(args)
        dataset, method, seed, init = stored["dataset"], stored["method"], stored["seed"], stored.get("init")
        cfg = RunConfig(**stored["config"])
        out = Path(args.resume)
        statistics = stored.get("standardization")
        if args.overwrite:
            raise PoiseError("--resume continues the run and --overwrite deletes it; give one of them")
    else:
        missing = [flag for flag, value in (("--dataset", args.dataset), ("--method", args.method), ("--out", args.out))
                   if value is None]
        if missing:
            raise PoiseError(f"poise train needs {', '.join(missing)} (or --resume DIR to continue a run)")
        if args.seed is not None:
            _check_seed(args.seed)
        dataset, seed, init = args.dataset, 0 if args.seed is None else args.seed, args.init
        cfg = _config(args)
        method = resolve_method(args.method, cfg)
        out = Path(args.out)
        statistics = None
        from poise.train.run_files import check_out_dir

        check_out_dir(out)
    check_method_names(method)
    splits = splits_for(dataset, cfg, statistics)
    expand_methods(method, tuple(splits.info.modalities))
    if "[" in method or "," in method:
        raise ConfigError(f"poise train runs one method, got '{method}'; variants NAME[KEY=VALUE;...] and lists "
                          "are for poise bench (here: --set KEY=VALUE, and --init DIR after poise pretrain)")
    try:
        from poise.train.factory import join_process_group

        join_process_group(cfg)  # under torchrun: join the run's process group, explicitly
        # refuse an incompatible method, fusion or option before anything is written
        Trainer(splits, make_method(method, method_options(cfg, method)), cfg, seed=seed, method_name=method).build_model()
        if not args.resume and is_main_process():
            _prepare_out(out, args.overwrite, False, "a run", RUN_OUTPUTS)
        run = train_one(dataset, method, cfg.model_dump(), seed, str(out), init_dir=init, resume=bool(args.resume),
                        epoch_lines=True)
        if not is_main_process():
            return 0
    finally:
        shutdown()
    t = run["test"]
    chosen = "best epoch" if run.get("selection", "validation") == "validation" else "last epoch (no validation split)"
    print(f"{method} seed {seed}: test accuracy {t['accuracy']:.4f}, macro-F1 {t['macro_f1']:.4f}, "
          f"{chosen} {run['best_epoch']}")
    if run.get("released_test_selected"):
        r = run["released_test_selected"]
        print(f"  released protocol, TEST-SELECTED (epoch {r['epoch']} by test accuracy, as the papers' code): "
              f"accuracy {r['accuracy']:.4f}, macro-F1 {r['macro_f1']:.4f}")
    for m in t["unimodal_accuracy"]:
        probe = t["probe_accuracy"].get(m)
        print(f"  {m}: head {t['unimodal_accuracy'][m]:.4f}" + (f", probe {probe:.4f}" if probe is not None else ""))
    for note in run.get("notes", []):
        print(f"note: {note}")
    print(f"written to {out}")
    return 0


def cmd_eval(args) -> int:
    from poise.bench import RUN_FILE
    from poise.config import parse_set
    from poise.eval.robustness import bench_run_dirs, evaluate_run, robustness_table, summary_table
    from poise.io import atomic_write_text

    try:
        rates = [float(r) for r in args.missing_rates.split(",") if r.strip()]
    except ValueError:
        raise PoiseError(f"--missing-rates expects comma-separated numbers, got '{args.missing_rates}'") from None
    folder = Path(args.dir)
    overrides = parse_set(args.sets)
    name = f"eval_{args.split}.json"
    if (folder / "results.json").is_file() and not (folder / RUN_FILE).is_file():  # a bench folder: every run
        reports = []
        for run_dir in bench_run_dirs(folder):
            reports.append(evaluate_run(run_dir, overrides, args.split, rates, args.drop_each))
            atomic_write_text(json.dumps(reports[-1], indent=1), run_dir / name)
            print(f"{reports[-1]['method']} seed {reports[-1]['seed']}: accuracy "
                  f"{reports[-1]['results'][0]['accuracy']:.4f} as configured", flush=True)
        table = summary_table(reports)
        atomic_write_text(json.dumps({"split": args.split, "runs": reports}, indent=1), folder / name)
        atomic_write_text(f"# poise eval: {args.split} accuracy (%), mean ± std over seeds\n\n{table}\n",
                          folder / f"eval_{args.split}.md")
        print()
        print(table)
        print(f"written to {folder / name} and {folder / f'eval_{args.split}.md'}")
        return 0
    report = evaluate_run(folder, overrides, args.split, rates, args.drop_each)
    atomic_write_text(json.dumps(report, indent=1), folder / name)
    print(f"{report['method']} seed {report['seed']} ({report['dataset']}), best epoch {report['best_epoch']}, "
          f"{args.split} split:")
    print(robustness_table(report))
    print(f"written to {folder / name}")
    return 0


def cmd_bench(args) -> int:
    from poise.bench import BENCH_OUTPUTS, BenchInterrupted, check_method_names, expand_methods, run_bench, splits_for
    from poise.eval.report import TEST_SELECTED_NOTE, has_test_selected, summary_table, write_report

    cfg = _config(args)
    seeds = _parse_seeds(args.seeds)
    check_method_names(args.methods)
    methods = expand_methods(args.methods, tuple(splits_for(args.dataset, cfg).info.modalities))
    if args.workers < 1:
        raise PoiseError(f"--workers must be at least 1, got {args.workers}")
    out = Path(args.out)
    if os.environ.get("RANK", "0") == "0":
        # an earlier bench is deleted by run_bench once every method has been validated
        _prepare_out(out, args.overwrite, args.resume, "a bench", BENCH_OUTPUTS, clear=False)
    from poise.train.distributed import is_main_process, shutdown

    import signal
    import threading

    stopped: list[int] = []

    def on_interrupt(signum, frame):  # the first Ctrl-C or SIGTERM stops the bench, the next ones are ignored
        if not stopped:
            stopped.append(signum)
            raise KeyboardInterrupt

    handled = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    previous = {sig: signal.signal(sig, on_interrupt) for sig in handled}
    main_process = os.environ.get("RANK", "0") == "0"  # torchrun: rank 0 alone prints and writes
    if main_process:
        print(f"bench on {args.dataset}: {len(methods)} methods x {len(seeds)} seeds -> {out}", flush=True)
    try:
        results = run_bench(args.dataset, methods, seeds, cfg, out, workers=args.workers,
                            log=lambda line: print(line, flush=True) if main_process else None, resume=args.resume,
                            overwrite=args.overwrite, command=shlex.join(["poise", *args.argv]))
        if not is_main_process():
            return 0
    except BenchInterrupted as stop:
        if args.standalone:  # the process ends: ignored also through the interpreter's exit, which restores defaults
            previous = {sig: signal.SIG_IGN for sig in handled}
        argv = [a for a in args.argv if a != "--overwrite"]  # the resumed bench must keep the finished runs
        again = shlex.join(["poise", *argv, *([] if "--resume" in argv else ["--resume"])])
        print(f"poise: interrupted: {stop.finished} of {stop.total} runs finished and are kept in {stop.results_path}; "
              f"the others are stopped; continue with: {again}", file=sys.stderr, flush=True)
        return 128 + (stopped[0] if stopped else stop.signum)
    finally:
        shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
    write_report(results, out)
    print()
    print(summary_table(results))
    if has_test_selected(results):
        print(TEST_SELECTED_NOTE)
    print(f"\nreport: {out / 'report.md'}")
    return 0


def cmd_tune(args) -> int:
    from poise.bench import check_method_names, expand_methods, split_methods, splits_for
    from poise.eval.leaderboard import leaderboard_table, write_tune_report
    from poise.tune import TUNE_OUTPUTS, run_tune

    cfg = _config(args)
    seeds = _parse_seeds(args.seeds)
    if "all" in split_methods(args.methods):
        raise PoiseError("poise tune takes the methods by name (e.g. joint,ogm_ge,mla), not 'all': every method "
                         "costs --trials runs")
    check_method_names(args.methods)
    methods = expand_methods(args.methods, tuple(splits_for(args.dataset, cfg).info.modalities))
    if args.workers < 1:
        raise PoiseError(f"--workers must be at least 1, got {args.workers}")
    out = Path(args.out)
    _prepare_out(out, args.overwrite, args.resume, "a tune", TUNE_OUTPUTS, clear=False)
    print(f"tune on {args.dataset}: {len(methods)} methods x {args.trials} trials, then {len(seeds)} seeds each -> {out}",
          flush=True)
    try:
        results = run_tune(args.dataset, methods, args.trials, seeds, cfg, out, workers=args.workers,
                           storage=args.storage, log=lambda line: print(line, flush=True), overwrite=args.overwrite,
                           command=shlex.join(["poise", *args.argv]))
    except KeyboardInterrupt:
        argv = [a for a in args.argv if a != "--overwrite"]
        again = shlex.join(["poise", *argv, *([] if "--resume" in argv else ["--resume"])])
        print(f"poise: interrupted; the finished trials and runs are kept in {out}; continue with: {again}",
              file=sys.stderr, flush=True)
        return 130
    write_tune_report(results, out)
    print()
    print(leaderboard_table(results))
    print(f"\nreport: {out / 'report.md'}")
    return 0


def cmd_report(args) -> int:
    from poise.eval.report import TEST_SELECTED_NOTE, has_test_selected, summary_table, write_report

    path = Path(args.dir) / "results.json"
    if not path.is_file():
        raise PoiseError(f"'{path}' does not exist: give a folder written by 'poise bench'")
    try:
        results = json.loads(path.read_text())
        results["dataset"], results["runs"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise PoiseError(f"'{path}' is not a poise results file: {json_problem(e)}") from None
    if not isinstance(results["runs"], list) or not results["runs"]:
        raise PoiseError(f"'{path}' holds no runs: nothing to report (the bench stopped before its first run finished; "
                         "continue it with poise bench ... --resume)")
    if "tuning" in results:  # a poise tune folder
        from poise.eval.leaderboard import leaderboard_table, write_tune_report

        write_tune_report(results, Path(args.dir))
        print(leaderboard_table(results))
        return 0
    write_report(results, Path(args.dir))
    print(summary_table(results))
    if has_test_selected(results):
        print(TEST_SELECTED_NOTE)
    return 0


def cmd_pretrain(args) -> int:
    from poise.bench import splits_for
    from poise.train.distributed import launched_by_torchrun
    from poise.train.pretrain import run_pretrain

    if launched_by_torchrun():
        raise PoiseError("poise pretrain runs in one process (its contrastive negatives are the whole batch); start it "
                         "without torchrun, then give its folder to 'torchrun ... -m poise train --init DIR'")
    _check_seed(args.seed)
    cfg = _config(args)
    summary = run_pretrain(splits_for(args.dataset, cfg), cfg, Path(args.out), args.seed, args.objective,
                           epochs=args.epochs, temperature=args.temperature)
    print(json.dumps({k: v for k, v in summary.items() if k != "permutations"}, indent=1))
    if "note" in summary:
        print(summary["note"], file=sys.stderr)
    return 0


def cmd_prepare(args) -> int:
    from poise.data.prepare import run_prepare

    if args.workers < 1:
        raise PoiseError(f"--workers must be at least 1, got {args.workers}")
    summary = run_prepare(args.dataset, Path(args.raw), Path(args.out), workers=args.workers, progress=sys.stderr.isatty(),
                          flow=args.flow)
    print(f"{args.dataset}: {summary['prepared']} clips prepared, {summary['already_prepared']} already done, "
          f"{summary['skipped']} skipped (listed in {summary['report']})")
    for line in summary.get("listed_twice", []):
        print(line)
    return 0


def cmd_list(args) -> int:
    from poise.config import config_keys, flatten, option_rows
    from poise.data.registry import DATASETS
    from poise.methods.registry import METHODS
    from poise.models.encoders import ENCODERS
    from poise.models.fusion import FUSIONS

    def options(model, indent="    "):
        rows = option_rows(model)
        for key, default, description in rows:
            print(f"{indent}{key} = {default!r}" + (f"  {description}" if description else ""))
        return rows

    for title, reg in (("datasets", DATASETS), ("methods", METHODS), ("fusions", FUSIONS), ("encoders", ENCODERS)):
        print(f"{title}: {', '.join(reg)}")
    print("\ndataset options (--set dataset.OPTION=VALUE), with the defaults of each dataset:")
    for name, kind in DATASETS.items():
        print(f"  {name}{':PATH' if kind.needs_arg else ''}")
        if not options(kind.Options):
            print("    (no options)")
        tuned = {key: value for key, value in flatten(kind.defaults).items() if not key.startswith("dataset.")}
        if tuned:  # the dataset's own layer of the configuration, under the user's
            print(textwrap.fill(", ".join(f"{key} = {value!r}" for key, value in tuned.items()), width=110,
                                initial_indent="    its defaults: ", subsequent_indent=" " * 6))
    print("\nmethod options (--set method.NAME.OPTION=VALUE), with their defaults:")
    for name, cls in METHODS.items():
        if name == "unimodal":
            print("  unimodal:<modality>  (the modality is given in the name)")
            continue
        print(f"  {name}")
        if not options(cls.Params):
            print("    (no options)")
        if cls.Params.tunable:
            print("    poise tune searches: " + ", ".join(f"{cls.Params.model_fields[k].alias or k} {r}"
                                                      for k, r in cls.Params.tunable.items()))
    from poise.config import TrainerConfig

    print("\npoise tune also searches, for every method: "
          + ", ".join(f"trainer.{k} {r}" for k, r in TrainerConfig.tunable.items()))
    print("\nconfig keys (--set KEY=VALUE):")
    for key, default, description in config_keys():
        shown = key if "<" in key else f"{key} = {default!r}"
        print(f"  {shown}  {description}")
    return 0


COMMANDS = {"train": cmd_train, "bench": cmd_bench, "report": cmd_report, "pretrain": cmd_pretrain, "list": cmd_list,
            "prepare": cmd_prepare, "eval": cmd_eval, "tune": cmd_tune}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # to tell how to resume
    args.standalone = argv is None  # the command line's own process, not a call from Python
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
