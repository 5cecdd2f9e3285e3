"""Pictures of a bench run (``python -m torchrpc.bench --plot DIR``): PNGs a person reads at a glance."""
from __future__ import annotations

import os

from .runner import BACKENDS, WORKLOADS


def plot_autograd_at_size(rows: list[dict], path: str) -> bool:
    """W7: microseconds per call (forward) and per send (backward) against the number of sends
    in the context, torchrpc and torch, medians with min-max bars. Whether there was W7 to plot."""
    by_key = {r["key"]: r for r in rows if r.get("workload") == "W7"}
    sizes = sorted({int(k.rsplit("_", 1)[1]) for k in by_key if k.startswith(("fwd_us_", "bwd_us_"))})
    sizes = [n for n in sizes if by_key.get(f"fwd_us_{n}", {}).get("torchrpc", {}).get("median") is not None]
    if not sizes:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for ax, (prefix, what) in zip(axes, [("fwd_us", "forward: µs per call"), ("bwd_us", "backward: µs per send")]):
        for backend, style in zip(BACKENDS, ("o-", "s--")):
            stats = [by_key[f"{prefix}_{n}"][backend] for n in sizes]
            med = [s["median"] for s in stats]
            if any(v is None for v in med):
                continue
            lo = [m - s["min"] for m, s in zip(med, stats)]
            hi = [s["max"] - m for m, s in zip(med, stats)]
            ax.errorbar(sizes, med, yerr=[lo, hi], fmt=style, capsize=3, label=backend)
        ax.set_xscale("log")
        ax.set_xlabel("sends in one distributed autograd context (N)")
        ax.set_title(what)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(WORKLOADS["W7"].title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_plots(rows: list[dict], directory: str) -> list[str]:
    """Write every plot this run has data for into ``directory``; the paths written."""
    os.makedirs(directory, exist_ok=True)
    written = []
    path = os.path.join(directory, "autograd_at_size.png")
    if plot_autograd_at_size(rows, path):
        written.append(path)
    return written
