"""Is a difference against the baseline real? The paired difference over seeds with a t-interval.

Runs of two methods with the same seed share the data split, the batch order and, where the models are
alike, the initial weights, so their accuracies are paired: the difference ``d_s = a_s - b_s`` per seed
removes what the seed does to both. With n seeds (3 to 5 in practice) the interval is Student's:
``mean(d) ± t_{0.975, n-1} · sd(d) / sqrt(n)``, which assumes the per-seed differences are independent
draws from a normal distribution. A bootstrap over 3 seeds has 10 distinct resamples and no better
footing, so it is not used. A difference is marked only when its interval excludes zero.
"""

from __future__ import annotations

import math
from typing import Any

#: the baseline every method is compared with
BASELINE = "joint"


def paired_difference(values: dict[int, float], baseline: dict[int, float], confidence: float = 0.95) -> dict[str, Any]:
    """``values`` and ``baseline``: seed -> accuracy. The mean of ``values[s] - baseline[s]`` over the seeds
    both have, its ``confidence`` t-interval (``low``, ``high``; None with fewer than 2 common seeds) and
    ``significant``: the interval excludes zero."""
    from scipy.stats import t

    seeds = sorted(set(values) & set(baseline))
    differences = [values[s] - baseline[s] for s in seeds]
    n = len(differences)
    if n == 0:
        return {"n": 0, "seeds": [], "mean": None, "low": None, "high": None, "confidence": confidence,
                "significant": False}
    mean = sum(differences) / n
    if n < 2:
        return {"n": 1, "seeds": seeds, "mean": mean, "low": None, "high": None, "confidence": confidence,
                "significant": False}
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1))
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    return {"n": n, "seeds": seeds, "mean": mean, "low": low, "high": high, "confidence": confidence,
            "significant": bool(low > 0 or high < 0)}


def accuracy_by_seed(runs: list[dict]) -> dict[int, float]:
    return {int(r["seed"]): float(r["test"]["accuracy"]) for r in runs}


def against_baseline(groups: dict[str, list[dict]], baseline: str = BASELINE) -> dict[str, dict[str, Any]]:
    """Per row of ``groups`` (name -> its runs) but the baseline's: the paired difference of test accuracy
    against the baseline's runs; {} when there is no baseline row."""
    if baseline not in groups:
        return {}
    reference = accuracy_by_seed(groups[baseline])
    return {name: paired_difference(accuracy_by_seed(runs), reference)
            for name, runs in groups.items() if name != baseline}


def format_difference(result: dict[str, Any] | None, scale: float = 100.0) -> str:
    """``+1.23 [+0.10, +2.36] *`` (in points; ``*``: the interval excludes zero), ``+1.23 (1 seed)``, or ``-``."""
    if not result or result.get("mean") is None:
        return "-"
    mean = f"{result['mean'] * scale:+.2f}"
    if result.get("low") is None:
        return f"{mean} (1 seed, no interval)"
    text = f"{mean} [{result['low'] * scale:+.2f}, {result['high'] * scale:+.2f}]"
    return text + (" *" if result["significant"] else "")


SIGNIFICANCE_NOTE = (f"`Δ vs {BASELINE}`: mean paired difference of test accuracy against `{BASELINE}` over the seeds both "
                     "rows have (points), with its 95 % Student t-interval `mean ± t(0.975, n-1) · sd / √n`; `*`: the "
                     "interval excludes zero. It assumes the per-seed differences are independent and normal; with "
                     "3 seeds t = 4.30, so only differences large against their spread are marked.")
