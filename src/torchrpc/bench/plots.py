"""Pictures of a bench run (``python -m torchrpc.bench --plot DIR``): PNGs a person reads at a glance.

``autograd_at_size.png`` (W7); ``ratio_fanin.png`` (W13), ``ratio_chain_depth.png`` (W11) and
``ratio_payload.png`` (W14): both libraries against the size, and torchrpc / torch with 1.0 marked."""
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


#: The shapes drawn against a size: (file, workload, key prefix, x axis label, log x); the rest of
#: each key is the x value (a count, or a size such as 64KiB)
RATIO_PLOTS = (
    ("ratio_fanin.png", "W13", "calls_per_s_", "trainers calling one parameter server (world size = trainers + 1)",
     False),
    ("ratio_chain_depth.png", "W11", "p50_us_d", "chain depth: worker0 -> ... -> worker<depth> "
     "(world size = depth + 1)", False),
    ("ratio_payload.png", "W14", "p50_us_", "payload of identity(t), each way", True),
)
_UNITS = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def _x_of(suffix: str) -> float:
    """The x value a key's suffix stands for: '7' -> 7, '4' -> 4, '64KiB' -> 65536."""
    for unit, scale in _UNITS.items():
        if suffix.endswith(unit):
            return float(suffix[:-len(unit)]) * scale
    return float(suffix)


def plot_ratio(rows: list[dict], wid: str, prefix: str, xlabel: str, logx: bool, path: str) -> bool:
    """Left, both libraries' medians (min-max bars) against the size; right, torchrpc / torch
    with the 1.0 line marked and the side where torchrpc wins shaded. Whether there was data."""
    series = sorted(((_x_of(r["key"][len(prefix):]), r["key"][len(prefix):], r) for r in rows
                     if r.get("kind") == "compare" and r.get("workload") == wid and r["key"].startswith(prefix)
                     and r.get("ratio_torchrpc_over_torch") is not None), key=lambda t: t[0])
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [x for x, _, _ in series]
    ticks = [label for _, label, _ in series]
    first = series[0][2]
    better = first["better"]
    fig, (ax, rx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for backend, style in zip(BACKENDS, ("o-", "s--")):
        stats = [r[backend] for _, _, r in series]
        med = [s["median"] for s in stats]
        lo = [m - s["min"] for m, s in zip(med, stats)]
        hi = [s["max"] - m for m, s in zip(med, stats)]
        ax.errorbar(xs, med, yerr=[lo, hi], fmt=style, capsize=3, label=backend)
    ax.set_ylabel(f"{first['unit']} ({better} is better)")
    ax.set_title("median over rounds, min-max bars")
    if logx:
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
    ratios = [r["ratio_torchrpc_over_torch"] for _, _, r in series]
    # the spread of the ratio: the extremes of torchrpc's rounds over the other extremes of torch's
    lo_r = [r["torchrpc"]["min"] / r["torch"]["max"] for _, _, r in series]
    hi_r = [r["torchrpc"]["max"] / r["torch"]["min"] for _, _, r in series]
    rx.errorbar(xs, ratios, yerr=[[m - lo for m, lo in zip(ratios, lo_r)], [hi - m for m, hi in zip(ratios, hi_r)]],
                fmt="o-", color="C2", capsize=3, label="torchrpc / torch (medians; bars: extreme rounds)")
    for x, v in zip(xs, ratios):
        rx.annotate(f"{v:.2f}", (x, v), textcoords="offset points", xytext=(6, 6), fontsize=9)
    rx.axhline(1.0, color="black", linewidth=1.2, linestyle=":", label="1.0: as fast as torch")
    top = max(1.6, max(hi_r) * 1.1)
    if better == "lower":
        rx.axhspan(0, 1.0, color="C2", alpha=0.08, label="torchrpc faster")
    else:
        rx.axhspan(1.0, top, color="C2", alpha=0.08, label="torchrpc faster")
    rx.set_ylim(0, top)
    rx.set_ylabel("torchrpc median / torch median")
    rx.set_title(f"ratio ({better} is better for torchrpc)")
    for a in (ax, rx):
        if logx:
            a.set_xscale("log", base=2)
        a.minorticks_off()
        a.set_xticks(xs)
        a.set_xticklabels(ticks)
        a.set_xlabel(xlabel, fontsize=9)
        a.grid(True, alpha=0.3)
        a.legend(fontsize=8)
        a.margins(x=0.08)
    fig.suptitle(f"{wid}: {WORKLOADS[wid].title}", fontsize=10)
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
    for name, wid, prefix, xlabel, logx in RATIO_PLOTS:
        path = os.path.join(directory, name)
        if plot_ratio(rows, wid, prefix, xlabel, logx, path):
            written.append(path)
    return written
