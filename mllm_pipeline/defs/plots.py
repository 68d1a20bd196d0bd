"""Small pictures for the UI: matplotlib charts as inline PNGs in markdown metadata; links to tracked runs."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence

import numpy as np


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _figure(width: float = 6.0, height: float = 3.0):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def markdown_image(png_b64: str, title: str) -> str:
    return f"{title}\n\n![{title}](data:image/png;base64,{png_b64})"


def histogram(series: Mapping[str, Sequence[float] | np.ndarray], title: str, xlabel: str, bins: int = 40,
              log_y: bool = False, vline: float | None = None) -> str | None:
    """Overlaid histograms of one or more named series, as a markdown image (None when there is no data)."""
    arrays = {k: np.asarray(v, dtype=float) for k, v in series.items() if len(v)}
    if not arrays:
        return None
    fig, ax = _figure()
    lo = min(float(a.min()) for a in arrays.values())
    hi = max(float(a.max()) for a in arrays.values())
    edges = np.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
    for name, a in arrays.items():
        ax.hist(a, bins=edges, alpha=0.6, label=f"{name} ({len(a):,})")
    if vline is not None:
        ax.axvline(vline, color="black", linestyle="--", linewidth=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    return markdown_image(_png(fig), title)


def line_chart(x: Sequence[float], ys: Mapping[str, Sequence[float]], title: str, xlabel: str, ylabel: str) -> str | None:
    if not len(x):
        return None
    fig, ax = _figure()
    for name, y in ys.items():
        ax.plot(x[: len(y)], y, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(ys) > 1:
        ax.legend()
    return markdown_image(_png(fig), title)


def tracking_metadata(links: Mapping[str, str]) -> dict:
    """Metadata entries for a tracked run's links (:meth:`mllm_pipeline.tracking.Tracker.links`): ``wandb_run``
    (its URL online, else its local run directory, which ``wandb sync`` uploads) and ``tensorboard_log_dir``."""
    import dagster as dg

    md: dict = {}
    if links.get("wandb_url"):
        md["wandb_run"] = dg.MetadataValue.url(links["wandb_url"])
    elif links.get("wandb_run_dir"):
        md["wandb_run"] = dg.MetadataValue.path(links["wandb_run_dir"])
    if links.get("tensorboard_log_dir"):
        md["tensorboard_log_dir"] = dg.MetadataValue.path(links["tensorboard_log_dir"])
    return md
