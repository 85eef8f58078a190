"""Turn ``results.json`` into a markdown table and PNG plots."""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value), ignoring NaN."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def _fmt(values: list[float], scale: float = 100.0) -> str:
    """``mean ± sample std``; a single value has no spread, so it stands alone."""
    m, s = mean_std(values)
    if math.isnan(m):
        return "-"
    if sum(1 for x in values if x is not None and not math.isnan(x)) < 2:
        return f"{m * scale:.2f}"
    return f"{m * scale:.2f} ± {s * scale:.2f}"


def group_runs(results: dict) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for run in results["runs"]:
        groups[run["method"]].append(run)
    return dict(groups)


def modalities_of(results: dict) -> list[str]:
    seen: dict[str, None] = {}
    for run in results["runs"]:
        for m in run["test"]["probe_accuracy"] or run["test"]["unimodal_accuracy"]:
            seen[m] = None
    return list(seen)


def summary_table(results: dict) -> str:
    """Markdown: per method, fused accuracy and macro-F1, per-modality probe and head accuracy (mean ± std
    over seeds, in %), training seconds."""
    mods = modalities_of(results)
    head = ["method", "seeds", "accuracy", "macro-F1"] + [f"probe {m}" for m in mods] + [f"head {m}" for m in mods] + ["train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, runs in group_runs(results).items():
        row = [method, str(len(runs)), _fmt([r["test"]["accuracy"] for r in runs]), _fmt([r["test"]["macro_f1"] for r in runs])]
        row += [_fmt([r["test"]["probe_accuracy"].get(m, float("nan")) for r in runs]) for m in mods]
        row += [_fmt([r["test"]["unimodal_accuracy"].get(m, float("nan")) for r in runs]) for m in mods]
        m_s, _ = mean_std([r["train_seconds"] for r in runs])
        row.append(f"{m_s:.1f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_report(results: dict, out: Path) -> Path:
    plots = write_plots(results, out)
    text = [
        f"# poise bench: {results['dataset']}",
        "",
        "Test-split metrics of the checkpoint chosen on the validation split, in %: mean ± sample standard deviation "
        "over the row's seeds (n - 1 in the denominator; `seeds` is n; a row with one seed has no spread and shows "
        "its value alone).",
        "`probe m`: frozen linear probe on modality m's encoder features (trained on the train split).",
        "`head m`: accuracy of the model's own unimodal logits for m.",
        "",
        summary_table(results),
        "",
    ]
    for name in plots:
        text += [f"![{name}]({name})", ""]
    path = out / "report.md"
    from poise.train.trainer import atomic_write_text

    atomic_write_text("\n".join(text), path)
    return path


def _curves(runs: list[dict], getter) -> np.ndarray | None:
    """The mean over runs of one value per epoch; epochs in which a run did not record it are gaps."""
    series = [[np.nan if (v := getter(h)) is None else v for h in r["history"]] for r in runs]
    series = [s for s in series if s]
    if not series:
        return None
    n = min(len(s) for s in series)
    values = np.asarray([s[:n] for s in series], dtype=float)
    if np.isnan(values).all():
        return None
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an epoch no run recorded stays a gap
        return np.nanmean(values, axis=0)


def write_plots(results: dict, out: Path) -> list[str]:
    """unimodal_accuracy.png: per-modality validation accuracy over epochs, one panel per method;
    confidence_ratio.png: the OGM confidence ratio of each modality over epochs, per method;
    method_records.png: what each method decided per epoch (coefficients, weights), per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_runs(results)
    mods = modalities_of(results)
    written = []

    def grid(n):
        cols = min(4, max(1, n))
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
        for ax in axes.flat[n:]:
            ax.axis("off")
        return fig, list(axes.flat)

    def save(fig, name):
        fig.tight_layout()
        tmp = out / f".{name}.tmp.png"
        fig.savefig(tmp, dpi=90)
        plt.close(fig)
        tmp.replace(out / name)
        written.append(name)

    fig, axes = grid(len(groups))
    for ax, (method, runs) in zip(axes, groups.items()):
        for m in mods:
            c = _curves(runs, lambda h, m=m: h["val"]["unimodal_accuracy"].get(m))
            if c is not None:  # one colour per modality in every panel
                ax.plot(c * 100, label=m, color=f"C{mods.index(m) % 10}")
        c = _curves(runs, lambda h: h["val"]["accuracy"])
        if c is not None:
            ax.plot(c * 100, "k--", label="fused")
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("val acc %")
        ax.legend(fontsize=7)
    save(fig, "unimodal_accuracy.png")

    with_ratio = {k: v for k, v in groups.items() if any(r["history"] and r["history"][0]["confidence_ratio"] for r in v)}
    if with_ratio:
        fig, axes = grid(len(mods))
        for ax, m in zip(axes, mods):
            for i, (method, runs) in enumerate(with_ratio.items()):
                c = _curves(runs, lambda h, m=m: h["confidence_ratio"].get(m))
                if c is not None:  # ten colours, then the same colours dashed
                    ax.plot(c, label=method, color=f"C{i % 10}", linestyle="-" if i < 10 else "--")
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_yscale("log")
            ax.set_title(f"confidence ratio of {m}", fontsize=9)
            ax.set_xlabel("epoch")
        axes[len(mods) - 1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
        save(fig, "confidence_ratio.png")

    with_records = {k: v for k, v in groups.items() if any(h["method"] for r in v for h in r["history"])}
    if with_records:
        fig, axes = grid(len(with_records))
        for ax, (method, runs) in zip(axes, with_records.items()):
            keys = sorted({k for r in runs for h in r["history"] for k in h["method"]})
            for k in keys[:8]:
                c = _curves(runs, lambda h, k=k: h["method"].get(k))
                if c is not None:  # values recorded once (before training) show as points
                    ax.plot(c, marker="o" if np.isfinite(c).sum() < 3 else None, label=k)
            ax.set_title(method, fontsize=9)
            ax.set_xlabel("epoch")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6)
        save(fig, "method_records.png")
    return written
