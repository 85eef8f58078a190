"""``poise tune``'s report: the leaderboard of default against tuned configurations (report.md) and its
two plots, accuracy against overhead and each method's trial history."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from poise.eval.report import _fmt, group_runs, mean_std, palette, save_figure
from poise.eval.significance import BASELINE, SIGNIFICANCE_NOTE, against_baseline, format_difference


def weak_modality(runs: list[dict]) -> tuple[str | None, str]:
    """The modality whose encoder learned least under the baseline's default runs (lowest mean probe
    accuracy; the unimodal head's where no probe was fitted), and which measure named it."""
    for key in ("probe_accuracy", "unimodal_accuracy"):
        means = {}
        for m in {m for r in runs for m in r["test"].get(key, {})}:
            means[m] = mean_std([r["test"][key].get(m, float("nan")) for r in runs])[0]
        means = {m: v for m, v in means.items() if not math.isnan(v)}
        if means:
            return min(means, key=means.get), "probe" if key == "probe_accuracy" else "head"
    return None, "probe"


def _value(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def leaderboard_table(results: dict) -> str:
    """Markdown: per method, default and tuned test accuracy, the chosen options, the weak modality's probe
    (default -> tuned), the paired difference against the baseline (default and tuned), trials and time."""
    tuning = results["tuning"]
    default, tuned = group_runs({"runs": results["default_runs"]}), group_runs(results)
    reference = default.get(BASELINE) or next(iter(default.values()))
    weak, measure = weak_modality(reference)
    key = "probe_accuracy" if measure == "probe" else "unimodal_accuracy"
    d_default, d_tuned = against_baseline(default), against_baseline(tuned)
    head = ["method", "default accuracy", "tuned accuracy", "chosen", f"{measure} {weak}: default → tuned",
            f"Δ vs {BASELINE}, default", f"Δ vs {BASELINE}, tuned", "trials (done / pruned / error)", "tuning s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, summary in tuning["methods"].items():
        runs_d, runs_t = default.get(method, []), tuned.get(method, [])
        chosen = ", ".join(f"`{k.rpartition('.')[2]}`={_value(v)}" for k, v in summary["chosen"].items())

        def weak_of(runs):
            return _fmt([r["test"].get(key, {}).get(weak, float("nan")) for r in runs]) if weak else "-"

        row = [method, _fmt([r["test"]["accuracy"] for r in runs_d]), _fmt([r["test"]["accuracy"] for r in runs_t]),
               chosen, f"{weak_of(runs_d)} → {weak_of(runs_t)}",
               format_difference(d_default.get(method)) if method != BASELINE else "(baseline)",
               format_difference(d_tuned.get(method)) if method != BASELINE else "(baseline)",
               f"{summary['trials_complete']} / {summary['trials_pruned']} / {summary['trials_error']}",
               f"{summary['seconds']:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_tune_plots(results: dict, out: Path) -> list[str]:
    """accuracy_vs_overhead.png: test accuracy (mean ± sample std over seeds) against training time relative
    to the baseline's (mean ± std), default (hollow) and tuned (filled); trial_history.png: each method's
    trial objectives in order, pruned trials as crosses, the best so far as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    written = []

    def save(fig, name):
        save_figure(fig, out / name)
        written.append(name)

    methods = list(results["tuning"]["methods"])
    colours = dict(zip(methods, palette(len(methods))))
    default, tuned = group_runs({"runs": results["default_runs"]}), group_runs(results)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, groups, face in (("default", default, "none"), ("tuned", tuned, None)):
        base = groups.get(BASELINE)
        base_seconds = mean_std([r["train_seconds"] for r in base])[0] if base else float("nan")
        for method in methods:
            runs = groups.get(method)
            if not runs:
                continue
            acc_m, acc_s = mean_std([r["test"]["accuracy"] * 100 for r in runs])
            if base and base_seconds > 0:
                sec_m, sec_s = mean_std([r["train_seconds"] / base_seconds for r in runs])
            else:  # no baseline row: seconds as they are
                sec_m, sec_s = mean_std([r["train_seconds"] for r in runs])
            ax.errorbar(sec_m, acc_m, xerr=sec_s, yerr=acc_s, fmt="o", color=colours[method], capsize=3,
                        markerfacecolor=face or colours[method], label=f"{method} ({label})")
            if label == "tuned":
                ax.annotate(method, (sec_m, acc_m), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel(f"training seconds / {BASELINE}'s (default / default, tuned / tuned)" if BASELINE in tuned
                  else "training seconds")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("hollow: default configuration; filled: tuned; bars: ± 1 sample std over seeds", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    save(fig, "accuracy_vs_overhead.png")

    cols = min(3, len(methods))
    rows = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.0 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[len(methods):]:
        ax.axis("off")
    for ax, method in zip(axes.flat, methods):
        history = results["tuning"]["methods"][method]["history"]
        done = [(h["number"], h["value"] * 100) for h in history if h["state"] == "complete"]
        pruned = [(h["number"], h["value"] * 100) for h in history if h["state"] == "pruned" and h["value"] is not None]
        if done:
            ax.plot(*zip(*done), "o", color=colours[method], ms=4, label="finished")
        if pruned:
            ax.plot(*zip(*pruned), "x", color="grey", ms=5, label="pruned (best before)")
        if done:
            numbers = sorted(done)
            best = np.maximum.accumulate([v for _, v in numbers])
            # drawn half a trial past the last one, so that a best found by the last trial shows its step
            ax.step([n for n, _ in numbers] + [numbers[-1][0] + 0.5], [*best, best[-1]], where="post", color="black",
                    lw=1, label="best so far")
        ax.set_title(method)
        ax.set_xlabel("trial")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("validation accuracy (%)")
        ax.yaxis.set_tick_params(labelleft=True)
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
    fig.tight_layout()
    save(fig, "trial_history.png")
    return written


def write_tune_report(results: dict, out: Path) -> Path:
    """report.md of a ``poise tune`` folder."""
    from poise.io import atomic_write_text

    tuning = results["tuning"]
    env = results.get("environment") or {}
    plots = write_tune_plots(results, out)
    spaces = {m: s["search_space"] for m, s in tuning["methods"].items()}
    text = [
        f"# poise tune: {results['dataset']}",
        "",
        f"Command: `{results['command']}`" if results.get("command") else "Command: not recorded.",
        "",
        ("Versions: " + ", ".join(f"{k} {v}" for k, v in env.items()) + ".") if env else "",
        "",
        f"Every method had the same budget of {tuning['trials']} trials (Optuna, TPE sampler seeded "
        f"{tuning['sampler']['seed']} with {tuning['sampler']['n_startup_trials']} random start-up trials; median "
        f"pruning of a trial's per-epoch validation accuracy after {tuning['pruner']['n_warmup_steps']} epochs, "
        f"once {tuning['pruner']['n_startup_trials']} trials finished). A trial is one run with seed "
        f"{tuning['trial_seed']}; its objective is the best validation accuracy over its epochs. The test split "
        "is never read while tuning. The default and the chosen configuration of each method were then trained "
        f"with seeds {', '.join(map(str, tuning['seeds']))} and scored on test (the epoch chosen on validation). "
        f"Study storage: `{tuning['storage']}`.",
        "",
        "Test accuracy in %, mean ± sample std over the seeds. `chosen`: the tuned options (`lr` is "
        "`trainer.lr`, the others `method.<name>.<option>`). The weak modality is the one whose probe (or head) "
        f"is lowest under `{BASELINE}`'s default configuration. `tuning s`: the trials' summed training time.",
        SIGNIFICANCE_NOTE + f" Default rows are compared with `{BASELINE}` default, tuned rows with `{BASELINE}` tuned.",
        "",
        leaderboard_table(results),
        "",
        "## Search spaces",
        "",
        *[f"- `{m}`: " + ", ".join(f"`{k}` {r}" for k, r in space.items()) for m, space in spaces.items()],
        "",
    ]
    for name in plots:
        text += [f"![{name}]({name})", ""]
    path = out / "report.md"
    atomic_write_text("\n".join(text), path)
    return path


__all__ = ["leaderboard_table", "weak_modality", "write_tune_plots", "write_tune_report"]
