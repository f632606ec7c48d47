"""Statistics shared by the studies: mean ± std, and a paired bootstrap of a difference in means."""

from __future__ import annotations

import random
import statistics


def mean_std(values: list[float]) -> str:
    """'12.3' for one value, '12.3 ± 1.2' (mean ± sample std) for several, '-' for none."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"


def paired_bootstrap(
    diffs: dict[str, list[float]], resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """Confidence interval of a category average of paired differences.

    `diffs[task][i]` is the difference of two methods on test item i of the task (each already averaged
    over the seeds both methods ran). The statistic is the mean over tasks of each task's mean difference,
    as the category average is; a resample draws each task's items with replacement (stratified by task).
    Returns the observed difference and the percentile interval."""
    tasks = [t for t, d in diffs.items() if d]
    if not tasks:
        raise ValueError("paired_bootstrap: no paired items")
    observed = statistics.fmean(statistics.fmean(diffs[t]) for t in tasks)
    rng = random.Random(seed)
    stats = sorted(
        statistics.fmean(statistics.fmean(rng.choices(diffs[t], k=len(diffs[t]))) for t in tasks)
        for _ in range(resamples)
    )
    tail = (1 - level) / 2
    low, high = stats[int(tail * resamples)], stats[min(resamples - 1, int((1 - tail) * resamples))]
    return {"diff": observed, "ci_low": low, "ci_high": high, "items": sum(len(diffs[t]) for t in tasks)}
