"""Figures for every report (benchmarks, studies): a headless matplotlib figure, saved atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .files import atomic_write


def save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def figure(ncols: int = 1, width: float = 7.0) -> tuple[Any, list[Any]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width, 4.5), squeeze=False)
    return fig, list(axes[0])
