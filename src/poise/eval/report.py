"""Turn ``results.json`` into a markdown table and PNG plots."""

from __future__ import annotations

import math
import re
import textwrap
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np


def save_figure(fig, path: Path, dpi: int = 100, tight_bbox: bool = True) -> None:
    """Write a matplotlib figure to ``path`` (PNG) through a temporary file beside it and a rename, so that a
    reader never sees half a file, and close the figure."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=dpi, **({"bbox_inches": "tight"} if tight_bbox else {}))
    plt.close(fig)
    tmp.replace(path)


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


def family_of(spec: str, runs: list[dict] | None = None) -> str:
    """What a results row's method acts on (``poise.methods.base.FAMILIES``): ``ogm_ge[model.fusion=mfb]`` ->
    ``gradients``; a combination ``a+b`` -> its parts' families joined by `` + ``; ``other`` for a name that
    is not registered (results of another poise). With the row's ``runs``, a method whose family depends on
    its options (``modulate``'s actuator) is placed by the options its first run recorded."""
    from poise.methods.registry import METHODS

    recorded = ((runs or [{}])[0].get("config") or {}).get("method") or {}
    families: dict[str, None] = {}
    for part in spec.partition("[")[0].split("+"):
        name = part.strip().partition(":")[0]
        if name not in METHODS:
            families["other"] = None
            continue
        cls = METHODS[name]
        families[cls.family_for(recorded.get(name) or {}) if hasattr(cls, "family") else "other"] = None
    return " + ".join(families)


def grouped_by_family(results: dict) -> list[tuple[str, list[tuple[str, list[dict]]]]]:
    """The rows of ``group_runs`` grouped by family: the families in ``FAMILIES`` order, then any other
    (combinations, unregistered names) in order of appearance; within a family, the order of the results."""
    from poise.methods.base import FAMILIES

    groups: dict[str, list[tuple[str, list[dict]]]] = defaultdict(list)
    for method, runs in group_runs(results).items():
        groups[family_of(method, runs)].append((method, runs))
    order = [f for f in FAMILIES if f in groups] + [f for f in groups if f not in FAMILIES]
    return [(f, groups[f]) for f in order]


def time_vs_joint(results: dict) -> dict[str, float]:
    """Per row, its mean training seconds over those of ``joint`` in the same results (empty without a
    ``joint`` row): wall clock, so only comparable within one bench on one machine."""
    groups = group_runs(results)
    if "joint" not in groups:
        return {}
    joint, _ = mean_std([r["train_seconds"] for r in groups["joint"]])
    if not joint > 0:
        return {}
    return {method: mean_std([r["train_seconds"] for r in runs])[0] / joint for method, runs in groups.items()}


def summary_table(results: dict) -> str:
    """Markdown: per method, fused accuracy and macro-F1, per-modality probe and head accuracy (mean ± std
    over seeds, in %), training seconds and their ratio to ``joint``'s; the rows grouped by family (what the
    method acts on), each group under a row naming it when there are several."""
    mods = modalities_of(results)
    head = ["method", "seeds", "accuracy", "macro-F1"] + [f"probe {m}" for m in mods] + [f"head {m}" for m in mods] + ["train s", "time vs joint"]
    released = has_test_selected(results)
    if released:
        head.append("test-selected accuracy (released protocol)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ratios = time_vs_joint(results)
    families = grouped_by_family(results)
    for family, rows in families:
        if len(families) > 1:
            lines.append("| " + " | ".join([f"**{family}**"] + [""] * (len(head) - 1)) + " |")
        for method, runs in rows:
            row = [method, str(len(runs)), _fmt([r["test"]["accuracy"] for r in runs]), _fmt([r["test"]["macro_f1"] for r in runs])]
            row += [_fmt([r["test"]["probe_accuracy"].get(m, float("nan")) for r in runs]) for m in mods]
            row += [_fmt([r["test"]["unimodal_accuracy"].get(m, float("nan")) for r in runs]) for m in mods]
            m_s, _ = mean_std([r["train_seconds"] for r in runs])
            row.append(f"{m_s:.1f}")
            row.append(f"{ratios[method]:.2f}×" if method in ratios else "-")
            if released:
                row.append(_fmt([(r.get("released_test_selected") or {}).get("accuracy", float("nan")) for r in runs]))
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def has_test_selected(results: dict) -> bool:
    return any(r.get("released_test_selected") for r in results["runs"])


TEST_SELECTED_NOTE = ("`test-selected accuracy (released protocol)`: the epoch of best TEST accuracy, as the released code "
                      "of OGM-GE, MLA and BalanceBenchmark picks it (data.protocol released); selected on the test split, "
                      "so optimistic, and not comparable with the validation-selected columns.")


def notes_section(results: dict) -> str:
    """Markdown: the runs' notes (a modality that learned nothing, with its likely causes), or ''."""
    lines = [f"- `{run['method']}` seed {run['seed']}: {note}" for run in results["runs"] for note in run.get("notes", [])]
    if not lines:
        return ""
    return "\n".join(["## Modalities that learned nothing", "", *lines])


def significance_section(results: dict) -> str:
    """Markdown: every row's paired difference of test accuracy against ``joint`` with its 95 % interval, or ''
    when the bench has no ``joint`` row or nothing else."""
    from poise.eval.significance import BASELINE, SIGNIFICANCE_NOTE, against_baseline, format_difference

    against = against_baseline(group_runs(results))
    if not against:
        return ""
    lines = [f"## Against `{BASELINE}`", "", SIGNIFICANCE_NOTE, "", f"| method | paired seeds | Δ vs {BASELINE} (95 % CI) |",
             "|---|---|---|"]
    lines += [f"| {name} | {d['n']} | {format_difference(d)} |" for name, d in against.items()]
    return "\n".join(lines)


def _configuration_section(results: dict) -> list[str]:
    """The first run's configuration in full, and for every other row the keys where its own differs."""
    import json

    from poise.config import flatten

    groups = group_runs(results)
    if not groups:
        return []
    first_method, first_runs = next(iter(groups.items()))
    base = first_runs[0].get("config")
    if base is None:
        return []
    lines = ["## Configuration", "", f"Of `{first_method}` (every run, unless listed below):", "", "```json",
             json.dumps(base, indent=1, sort_keys=True), "```", ""]
    flat_base = flatten(base)
    for method, runs in groups.items():
        flat = flatten(runs[0].get("config", {}))
        differs = {k: flat.get(k) for k in sorted(set(flat) | set(flat_base)) if flat.get(k) != flat_base.get(k)}
        if differs:
            lines.append(f"- `{method}`: " + ", ".join(f"`{k}` = `{v!r}`" for k, v in differs.items()))
    return lines + [""]


def write_report(results: dict, out: Path) -> Path:
    """report.md: how the bench was run (command, versions, threads, configuration), the table and the plots."""
    plots, notes = write_plots(results, out)
    plots += write_learning_curves(results, out)
    decisions = write_decision_plots(results, out)
    env = results.get("environment") or {}
    command = results.get("command")
    threads = sorted({str(r.get("config", {}).get("trainer", {}).get("threads", "not recorded"))
                      for r in results["runs"]})
    text = [
        f"# poise bench: {results['dataset']}",
        "",
        f"Command: `{command}`" if command else "Command: not recorded (results.json from an older poise).",
        "",
        ("Versions: " + ", ".join(f"{k} {v}" for k, v in env.items()) + ".") if env else
        "Versions: not recorded (results.json from an older poise).",
        "",
        f"CPU threads per run (`trainer.threads`): {', '.join(threads)}.",
        "",
        "Test-split metrics of the checkpoint chosen on the validation split (the last epoch for runs without one), "
        "in %: mean ± sample standard deviation "
        "over the row's seeds (n - 1 in the denominator; `seeds` is n; a row with one seed has no spread and shows "
        "its value alone).",
        *([TEST_SELECTED_NOTE] if has_test_selected(results) else []),
        "`probe m`: frozen linear probe on modality m's encoder features (trained on the train split).",
        "`head m`: accuracy of the model's own unimodal logits for m.",
        "`time vs joint`: the row's mean training seconds over `joint`'s (wall clock, this machine and load).",
        "Rows are grouped by what the method acts on (`family`), each group under a row naming it.",
        "",
        summary_table(results),
        "",
    ]
    against = significance_section(results)
    if against:
        text += [against, ""]
    warnings_text = notes_section(results)
    if warnings_text:
        text += [warnings_text, ""]
    for name in plots:
        text += [f"![{name}]({name})", ""]
    text += [f"- {note}" for note in notes] + ([""] if notes else [])
    if decisions:
        text += ["## What each method decided, per epoch", "",
                 "Every quantity a method records, one file per method (lines: mean over seeds; bands: ± one "
                 "sample std; dots: values recorded in some epochs only; shading: the method's training phases):",
                 "", *(f"- [{name}]({name})" for name in decisions), ""]
    text += _configuration_section(results)
    path = out / "report.md"
    from poise.io import atomic_write_text

    atomic_write_text("\n".join(text), path)
    return path


def _series(runs: list[dict], getter) -> np.ndarray | None:
    """One row per run of one value per epoch (NaN where a run did not record it), cut to the shortest run."""
    series = [[np.nan if (v := getter(h)) is None else v for h in r["history"]] for r in runs]
    series = [s for s in series if s]
    if not series:
        return None
    n = min(len(s) for s in series)
    values = np.asarray([s[:n] for s in series], dtype=float)
    return None if np.isnan(values).all() else values


def _mean_and_spread(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per epoch, the mean over runs and the sample std (0 where fewer than two runs recorded it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an epoch no run recorded stays a gap
        mean = np.nanmean(values, axis=0)
        counts = np.sum(~np.isnan(values), axis=0)
        std = np.where(counts > 1, np.nanstd(values, axis=0, ddof=1) if values.shape[0] > 1 else 0.0, 0.0)
    return mean, np.nan_to_num(std)


def _band(ax, values: np.ndarray, color, label, linestyle: str = "-", positive: bool = False) -> None:
    """The mean over runs per epoch as a line, ± one sample std as a band. A value recorded in some epochs
    only (a diagnosis every K epochs, a phase) is drawn as dots at those epochs, joined by the line."""
    mean, std = _mean_and_spread(values)
    x = np.arange(len(mean))
    recorded = ~np.isnan(mean)
    sparse = not recorded.all()
    x, mean, std = x[recorded], mean[recorded], std[recorded]
    ax.plot(x, mean, color=color, linestyle=linestyle, label=label, lw=1.5, marker="o" if sparse else None, ms=3.5)
    low = mean - std
    if positive:  # a log axis has no room below zero
        low = np.where(low > 0, low, mean * 0.5)
    ax.fill_between(x, low, mean + std, color=color, alpha=0.2, lw=0)


def palette(n: int) -> list:
    """``n`` distinct colours (no colour twice up to 60): tab10, then tab20, then tab20 with tab20b and tab20c."""
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    colours = [colormaps["tab20"](i) for i in range(20)]
    if n > 20:
        colours += [colormaps["tab20b"](i) for i in range(20)] + [colormaps["tab20c"](i) for i in range(20)]
    if n > len(colours):
        raise ValueError(f"at most {len(colours)} distinct colours, asked for {n}")
    return colours[:n]


def _grid(n: int, cols_max: int = 4, width: float = 3.6, height: float = 2.8, sharey: bool = False):
    """A figure of ``n`` panels, at most ``cols_max`` a row, each ``width`` x ``height`` inches; the spare
    panels of the last row are blank. Returns the figure and all its axes, the ``n`` in use first."""
    import matplotlib.pyplot as plt

    cols = min(cols_max, max(1, n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows + 0.6), squeeze=False, sharey=sharey)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat)


def _legend_on_top(fig, axes) -> None:
    """One legend for the figure, above its panels (covering none), each label once."""
    handles, labels = {}, []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    if handles:
        fig.legend([handles[lab] for lab in labels], labels, loc="lower center", bbox_to_anchor=(0.5, 1.0),
                   ncol=min(len(labels), 6), frameon=False)


#: font sizes of every report figure
PLOT_FONTS = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 9}


def _epochs_axis(ax) -> None:
    """An x-axis of epochs: integer ticks."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _log_axis(ax, adaptive: bool = False) -> None:
    """A log y-axis with 1-2-5 ticks labelled as plain numbers and no minor labels. ``adaptive`` (call it
    after drawing): powers of ten only, at most 8, once the drawn range spans more than three decades,
    where 1-2-5 labels would overlap."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    subs, numticks = (1.0, 2.0, 5.0), None
    if adaptive:
        low, high = ax.get_ylim()
        decades = math.log10(high / low) if low > 0 and high > low else 1.0
        subs, numticks = (subs if decades <= 3 else (1.0,)), 8
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs, numticks=numticks))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


#: what a method records, with its unit, by the record's name without its modality part
QUANTITIES = {
    "coef": "gradient coefficient k (unitless)",
    "ratio": "confidence ratio ρ (unitless)",
    "weight": "loss weight (unitless)",
    "teacher": "teacher share (fraction of batches)",
    "kd": "distillation loss (nats)",
    "drop_rate": "dropped samples (fraction)",
    "q": "drop probability q (fraction)",
    "theta": "feature rescale θ (unitless)",
    "kept_samples": "samples kept in the loss (fraction)",
    "teacher_val_accuracy": "teacher validation accuracy (fraction)",
    "member_val_accuracy": "member validation accuracy (fraction)",
    "owm/trace": "trace of the OWM projection P (unitless)",
    "owm/head_grad_ratio": "projected / raw head gradient norm (unitless)",
    "fusion_weight": "test-time fusion weight (unitless)",
    "cos_true": "cosine of features and true-class weights (unitless)",
    "distance_own": "distance to own class's prototype (feature units)",
    "distance_other": "mean distance to other classes' prototypes (feature units)",
    "cos": "cosine of multimodal and unimodal gradients (unitless)",
    "weight_uni": "weight of the unimodal gradient (unitless)",
    "conflict": "steps with conflicting gradients (fraction)",
    "score": "cross-entropy of the Shapley response (nats)",
    "trace": "Fisher trace of the epoch (sum of mean squared gradients)",
    "trace_slope": "slope k of the Fisher trace (unitless)",
    "window": "steps inside the prime learning window (fraction)",
    "purity_train": "k-means purity, training split (fraction)",
    "purity_val": "k-means purity, validation split (fraction)",
    "purity_gap": "purity gap, training - validation (fraction)",
    "alpha": "re-initialisation strength α (fraction)",
    "phi": "mean Shapley value φ (unitless)",
    "copies": "extra samples in the next epoch (count)",
    "stage": "boosting stage (count)",
    "boost_rate": "ensemble scale b (unitless)",
    "learners": "learners in the ensemble (count)",
    "ga": "alignment (GA) loss (squared probability)",
}
#: a quantity whose name means another thing in one method than in ``QUANTITIES``
METHOD_QUANTITIES = {
    ("pmr", "ratio"): "prototype confidence ratio ρ (unitless)",
    ("pmr", "beta"): "weight β of the prototypical CE (unitless)",
    ("inforeg", "beta"): "proximal strength β (unitless)",
}


def quantity_label(method: str, quantity: str) -> str:
    """The y-axis label of ``quantity`` recorded by results row ``method`` (a variant or combination too)."""
    for part in method.partition("[")[0].split("+"):
        label = METHOD_QUANTITIES.get((part.strip().partition(":")[0], quantity))
        if label is not None:
            return label
    return QUANTITIES.get(quantity, f"{quantity} (as recorded)")
#: quantities that mean the same in every method that records them, so their panels share a y-range
#: (a ``weight`` is G-Blend's blending weight in one method and a learned loss weight in another)
COMPARABLE = ("coef", "ratio", "fusion_weight", "drop_rate")
#: at most this many quantities per method in method_records.png (the rest is named in the report)
MAX_QUANTITIES = 4


def split_record(key: str) -> tuple[str, str]:
    """``coef/audio`` -> (``coef``, ``audio``): the quantity and the series within it (a modality, a head);
    a name without a series part is its own quantity."""
    if key in QUANTITIES or "/" not in key:
        return key, key
    quantity, _, series = key.rpartition("/")
    return quantity, series


def write_plots(results: dict, out: Path) -> tuple[list[str], list[str]]:
    """unimodal_accuracy.png: per-modality and fused validation accuracy over epochs, one panel per method;
    confidence_ratio.png: the OGM confidence ratio of each modality over epochs, one panel per modality;
    method_records.png: what each method decided per epoch, one panel per quantity.
    Lines are means over seeds, bands ± one sample std. Returns the files written and notes for the report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_runs(results)
    mods = modalities_of(results)
    written: list[str] = []
    notes: list[str] = []
    band_note = "Lines: mean over seeds; bands: ± one sample standard deviation over seeds."
    plt.rcParams.update(PLOT_FONTS)

    def save(fig, name):
        save_figure(fig, out / name)
        written.append(name)

    # accuracy per method: one quantity (validation accuracy, %), one y-range for every panel
    mod_colours = dict(zip(mods, palette(len(mods))))
    fig, axes = _grid(len(groups), sharey=True)
    for ax, (method, runs) in zip(axes, groups.items()):
        for m in mods:
            values = _series(runs, lambda h, m=m: (h["val"] or {}).get("unimodal_accuracy", {}).get(m))
            if values is not None:
                _band(ax, values * 100, mod_colours[m], f"{m} head")
        values = _series(runs, lambda h: (h["val"] or {}).get("accuracy"))
        if values is not None:
            _band(ax, values * 100, "black", "fused", linestyle="--")
        ax.set_title(f"{method} ({len(runs)} seed{'s' * (len(runs) > 1)})")
        _epochs_axis(ax)
        ax.set_ylabel("validation accuracy (%)")
        ax.yaxis.set_tick_params(labelleft=True)
        ax.grid(alpha=0.3)
    _legend_on_top(fig, axes)
    fig.tight_layout()
    save(fig, "unimodal_accuracy.png")

    with_ratio = {k: v for k, v in groups.items()
                  if any(h.get("confidence_ratio") for r in v for h in r["history"])}
    if with_ratio:
        colours = dict(zip(with_ratio, palette(len(with_ratio))))
        fig, axes = _grid(len(mods), cols_max=2, width=5.0, height=3.6, sharey=True)
        for ax, m in zip(axes, mods):
            for method, runs in with_ratio.items():
                values = _series(runs, lambda h, m=m: h["confidence_ratio"].get(m))
                if values is not None:
                    _band(ax, values, colours[method], method, positive=True)
            ax.axhline(1.0, color="grey", lw=0.8, linestyle=":")
            _log_axis(ax)
            ax.yaxis.set_tick_params(which="both", labelleft=True)
            ax.set_title(f"{m}: confidence ratio (1 = balanced)")
            _epochs_axis(ax)
            ax.set_ylabel("confidence ratio ρ (unitless, log scale)")
            ax.yaxis.set_tick_params(labelleft=True)
            ax.grid(alpha=0.3, which="both")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False,
                   ncol=1 if len(labels) <= 18 else 2, title="method")
        fig.tight_layout()
        save(fig, "confidence_ratio.png")
        notes.append(f"confidence_ratio.png: {band_note}")

    with_records = {k: v for k, v in groups.items() if any(h["method"] for r in v for h in r["history"])}
    if with_records:
        panels = []  # (method, quantity, keys)
        for method, runs in with_records.items():
            quantities: dict[str, list[str]] = {}
            for key in sorted({k for r in runs for h in r["history"] for k in h["method"]}):
                quantities.setdefault(split_record(key)[0], []).append(key)
            shown = list(quantities.items())[:MAX_QUANTITIES]
            if len(quantities) > MAX_QUANTITIES:
                left = ", ".join(q for q in list(quantities)[MAX_QUANTITIES:])
                notes.append(f"method_records.png: `{method}` records {len(quantities)} quantities; the first "
                             f"{MAX_QUANTITIES} are drawn, not {left} (every record is in results.json).")
            panels += [(method, q, keys) for q, keys in shown]
        series_names = list(dict.fromkeys(split_record(k)[1] for _, _, keys in panels for k in keys))
        others = [s for s in series_names if s not in mod_colours]
        series_colours = {**mod_colours, **dict(zip(others, palette(len(mods) + len(others))[len(mods):]))}
        fig, axes = _grid(len(panels), width=3.8, height=3.0)
        once = []
        for ax, (method, quantity, keys) in zip(axes, panels):
            runs = with_records[method]
            per_key = {k: _series(runs, lambda h, k=k: h["method"].get(k)) for k in keys}
            per_key = {k: v for k, v in per_key.items() if v is not None}
            recorded = {k: np.unique(np.nonzero(~np.isnan(v))[1]) for k, v in per_key.items()}
            if per_key and all(len(epochs) == 1 for epochs in recorded.values()):
                # decided once (before training): a bar per series, not a dot on an epoch axis
                names = [split_record(k)[1] for k in per_key]
                values = [v[:, recorded[k][0]] for k, v in per_key.items()]
                means = [float(np.mean(v)) for v in values]
                stds = [float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for v in values]
                ax.bar(names, means, yerr=stds, capsize=3, color=[series_colours[n] for n in names])
                ax.set_xlabel("recorded once, before training")
                once.append(method)
            else:
                for k, values in per_key.items():
                    name = split_record(k)[1]
                    _band(ax, values, series_colours[name], name if name != quantity else None)
                _epochs_axis(ax)
            ax.set_title(f"{method}: {quantity}")
            ax.set_ylabel(quantity_label(method, quantity))
            ax.grid(alpha=0.3)
        by_quantity: dict[str, list] = {}
        for ax, (_, quantity, _) in zip(axes, panels):
            if quantity in COMPARABLE:
                by_quantity.setdefault(quantity, []).append(ax)
        for same in by_quantity.values():  # one quantity in several methods: one y-range to compare them on
            low = min(ax.get_ylim()[0] for ax in same)
            high = max(ax.get_ylim()[1] for ax in same)
            for ax in same:
                ax.set_ylim(low, high)
        _legend_on_top(fig, axes)
        fig.tight_layout()
        save(fig, "method_records.png")
        notes.append(f"method_records.png: {band_note} Bars (values decided once): mean over seeds, error bars "
                     "± one sample standard deviation. Panels of the same quantity (gradient coefficients, confidence ratios, ...) share their y-range.")
    notes.insert(0, f"unimodal_accuracy.png: {band_note} Every panel has the same y-range.")
    return written, notes


#: the folder of a bench's per-method decision plots
DECISIONS_DIR = "decisions"
#: quantities of one method drawn on one y-range in its decision plot (two sides of one comparison)
SAME_RANGE = (("purity_train", "purity_val"), ("distance_own", "distance_other"))


def decision_plot_name(method: str) -> str:
    """``decisions/<method>.png`` with every character but letters, digits and ``._+-`` as ``_``."""
    return f"{DECISIONS_DIR}/{re.sub(r'[^A-Za-z0-9._+-]', '_', method)}.png"


def write_decision_plots(results: dict, out: Path) -> list[str]:
    """decisions/<method>.png for every results row whose method records what it decides: one panel per
    quantity (every one of them), one line per series (modality), mean over seeds with ± one sample std;
    values recorded in some epochs only as dots; the epochs shaded by the training phase the method set
    (``set_phase``: ReconBoost's boosting and rectification). Returns the files written, relative to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    written: list[str] = []
    mods = modalities_of(results)
    for method, runs in group_runs(results).items():
        keys = sorted({k for r in runs for h in r["history"] for k in h["method"]})
        if not keys:
            continue
        quantities: dict[str, list[str]] = {}
        for key in keys:
            quantities.setdefault(split_record(key)[0], []).append(key)
        series = list(dict.fromkeys(split_record(k)[1] for k in keys))
        others = [n for n in series if n not in mods]
        colours = {**dict(zip(mods, palette(len(mods)))),
                   **dict(zip(others, palette(len(mods) + len(others))[len(mods):]))}
        # the phase of each epoch, from the first run (a schedule: the same in every seed)
        phases = [h.get("phase") for h in runs[0]["history"]]
        epochs = max(len(r["history"]) for r in runs)
        names = list(dict.fromkeys(p for p in phases if p is not None))
        shades = dict(zip(names, [plt.get_cmap("Pastel1")(i % 9) for i in range(len(names))]))
        cols = min(3, len(quantities))
        rows = math.ceil(len(quantities) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows + 0.7), squeeze=False)
        for ax in axes.flat[len(quantities):]:
            ax.axis("off")
        for ax, (quantity, qkeys) in zip(axes.flat, quantities.items()):
            for epoch, phase in enumerate(phases):
                if phase is not None:
                    ax.axvspan(epoch - 0.5, epoch + 0.5, color=shades[phase], alpha=0.5, lw=0, zorder=0)
            for key in qkeys:
                values = _series(runs, lambda h, k=key: h["method"].get(k))
                if values is not None:
                    name = split_record(key)[1]
                    _band(ax, values, colours[name], name if name != quantity else None)
            ax.set_title(quantity)
            _epochs_axis(ax)
            ax.set_xlim(-0.5, epochs - 0.5)  # every panel on the run's whole epoch axis
            ax.set_ylabel(textwrap.fill(quantity_label(method, quantity), 34))
            ax.grid(alpha=0.3)
        panels = dict(zip(quantities, axes.flat))
        for group in SAME_RANGE:
            same = [panels[q] for q in group if q in panels]
            if len(same) > 1:
                low = min(ax.get_ylim()[0] for ax in same)
                high = max(ax.get_ylim()[1] for ax in same)
                for ax in same:
                    ax.set_ylim(low, high)
        handles, labels = {}, []
        for ax in axes.flat:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in handles:
                    handles[lab] = h
                    labels.append(lab)
        for phase in names:
            handles[f"phase {phase}"] = Patch(color=shades[phase])
            labels.append(f"phase {phase}")
        seeds = f"{len(runs)} seed{'s' * (len(runs) > 1)}"
        fig.suptitle(f"{method}: what it decided per epoch ({seeds}; lines: mean, bands: ± one sample std)",
                     fontsize=10)
        fig.tight_layout()
        if labels:
            fig.legend([handles[lab] for lab in labels], labels, loc="upper center", bbox_to_anchor=(0.5, 0.0),
                       ncol=min(len(labels), 6), frameon=False)
        name = decision_plot_name(method)
        (out / DECISIONS_DIR).mkdir(parents=True, exist_ok=True)
        save_figure(fig, out / name, dpi=90)
        written.append(name)
    return written


def write_learning_curves(results: dict, out: Path) -> list[str]:
    """learning_curves.png: per method (one panel each), the training loss (solid) and validation loss
    (dashed) of every head (fused, then each modality) over epochs, as in G-Blend's learning-curve figure,
    on a log-scaled loss axis per panel (one method's loss spike would flatten every other panel on a shared
    one; the figure compares heads and splits within a method); modality_gap.png: the distance between each pair of modalities'
    feature centroids over epochs, for the runs whose fusion puts features in one space. Lines are means over
    seeds, bands ± one sample std; legends sit outside the panels. Runs without these logs are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(PLOT_FONTS)
    groups = {k: v for k, v in group_runs(results).items()
              if any(h.get("head_train_loss") for r in v for h in r["history"])}
    written = []

    def save(fig, name):
        save_figure(fig, out / name)
        written.append(name)

    def seeds(runs):
        return f"{len(runs)} seed{'s' * (len(runs) > 1)}"

    if groups:
        heads = list(dict.fromkeys(k for v in groups.values() for r in v for h in r["history"]
                                   for k in h.get("head_train_loss", {})))
        colours = dict(zip(heads, ["black"] + palette(max(1, len(heads) - 1)) if heads[0] == "fused"
                           else palette(len(heads))))
        fig, axes = _grid(len(groups))
        for ax, (method, runs) in zip(axes, groups.items()):
            for head in heads:
                train = _series(runs, lambda h, k=head: h.get("head_train_loss", {}).get(k))
                val = _series(runs, lambda h, k=head: (h.get("val") or {}).get("head_loss", {}).get(k))
                if train is not None:
                    _band(ax, train, colours[head], f"{head}: training", positive=True)
                if val is not None:
                    _band(ax, val, colours[head], f"{head}: validation", linestyle="--", positive=True)
            _log_axis(ax, adaptive=True)
            ax.set_title(f"{method} ({seeds(runs)})")
            _epochs_axis(ax)
            ax.set_ylabel("cross-entropy (nats, log scale)")
            ax.grid(alpha=0.3, which="both")
        _legend_on_top(fig, axes)
        fig.tight_layout()
        save(fig, "learning_curves.png")

    with_gap = {k: v for k, v in group_runs(results).items()
                if any((h.get("val") or {}).get("modality_gap") for r in v for h in r["history"])}
    if with_gap:
        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        colours = dict(zip(with_gap, palette(len(with_gap))))
        for method, runs in with_gap.items():
            pairs = list(dict.fromkeys(k for r in runs for h in r["history"] for k in (h.get("val") or {}).get("modality_gap", {})))
            for j, pair in enumerate(pairs):
                values = _series(runs, lambda h, k=pair: (h.get("val") or {}).get("modality_gap", {}).get(k))
                if values is not None:
                    label = f"{method} ({seeds(runs)})" + (f", {pair}" if len(pairs) > 1 else "")
                    _band(ax, values, colours[method], label, linestyle=["-", "--", ":", "-."][j % 4])
        _epochs_axis(ax)
        ax.set_ylabel("distance between feature centroids\n(feature units)")
        ax.set_title("modality gap on the validation split")
        ax.grid(alpha=0.3)
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, title="method")
        fig.tight_layout()
        save(fig, "modality_gap.png")
    return written
