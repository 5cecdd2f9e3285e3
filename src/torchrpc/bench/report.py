"""Turning a :class:`runner.BenchRun` into rows, a text table and JSON lines."""
from __future__ import annotations

import json
import re
import statistics
from typing import Any, TextIO

from .runner import BACKENDS, FLOORS, WORKLOADS, BenchRun, Metric, RoundResult


def summarize(results: list[RoundResult], key: str) -> dict:
    """Median and min-max over the rounds that succeeded, the raw per-round values, and the failures."""
    values = [r.metrics[key] for r in results if r.status in ("ok", "partial") and key in r.metrics]
    out: dict[str, Any] = {
        "median": statistics.median(values) if values else None,
        "min": min(values) if values else None,
        "max": max(values) if values else None,
        "values": values,
        "rounds": len(results),
        "rounds_ok": len(values),
    }
    failures = [{"round": i + 1, **r.as_json()} for i, r in enumerate(results) if r.status != "ok"]
    if failures:
        out["failures"] = failures
    return out


def _ratio(a: dict, b: dict) -> float | None:
    if a["median"] is None or b["median"] is None or b["median"] == 0:
        return None
    return a["median"] / b["median"]


def verdict(ratio: float | None, better: str, overlap: bool) -> str:
    """Which backend is faster and by how much, from ratio = torchrpc / torch."""
    if ratio is None or ratio <= 0:
        return "n/a"
    speed = ratio if better == "higher" else 1.0 / ratio
    text = f"torchrpc {speed:.2f}x" if speed >= 1 else f"torch {1 / speed:.2f}x"
    return text + (" (ranges overlap)" if overlap else "")


def _overlap(a: dict, b: dict) -> bool:
    if a["median"] is None or b["median"] is None:
        return False
    return a["min"] <= b["max"] and b["min"] <= a["max"]


def build_rows(run: BenchRun) -> list[dict]:
    rows: list[dict] = []
    common = {"mode": run.mode, "rounds": run.rounds, "source": run.source}
    for fid, (short, title, ms) in FLOORS.items():
        if (fid, "floor") not in run.results:
            continue
        for m in ms:
            rows.append({"kind": "floor", "workload": fid, "name": short, "title": title, **_metric(m), **common,
                         "floor": summarize(run.results[(fid, "floor")], m.key)})
    for wid, w in WORKLOADS.items():
        if (wid, BACKENDS[0]) not in run.results:
            continue
        for m in w.metrics:
            row: dict[str, Any] = {"kind": "compare", "workload": wid, "name": w.short, "title": w.title,
                                   **_metric(m), **common}
            for b in BACKENDS:
                row[b] = summarize(run.results[(wid, b)], m.key)
            if not any(row[b]["values"] or row[b].get("failures") for b in BACKENDS):
                continue  # a metric this mode does not measure (W7's largest sizes in a quick run)
            ratio = _ratio(row["torchrpc"], row["torch"])
            row["ratio_torchrpc_over_torch"] = ratio
            row["ranges_overlap"] = _overlap(row["torchrpc"], row["torch"])
            row["verdict"] = verdict(ratio, m.better, row["ranges_overlap"])
            if w.reference:
                ref_key = w.reference.replace("-", "_")
                ref = row[ref_key] = summarize(run.results[(wid, w.reference)], m.key)
                for b in BACKENDS:
                    row[f"ratio_{b}_over_{ref_key}"] = _ratio(row[b], ref)
            rows.append(row)
    return rows


def _metric(m: Metric) -> dict:
    return {"metric": m.label, "key": m.key, "unit": m.unit, "better": m.better}


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def cell(s: dict) -> str:
    if s["median"] is None:
        return f"FAILED ({s['rounds'] - s['rounds_ok']}/{s['rounds']})"
    text = f"{fmt(s['median'])} [{fmt(s['min'])}-{fmt(s['max'])}]"
    if s["rounds_ok"] < s["rounds"]:
        text += f" ({s['rounds'] - s['rounds_ok']} failed)"
    return text


def _table(headers: list[str], body: list[list[str]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in [headers] + body) for i in range(len(headers))]
    line = "  ".join("-" * w for w in widths)
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip(), file=out)
    print(line, file=out)
    for r in body:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip(), file=out)


def print_report(run: BenchRun, rows: list[dict], out: TextIO, max_error_lines: int = 60) -> None:
    print(f"\ntorchrpc vs torch.distributed.rpc: mode={run.mode}, {run.rounds} round(s) per backend, "
          f"alternating, fresh processes per round; wall {run.wall_s:.0f} s", file=out)
    src = run.source
    if src:
        line = f"torch {src.get('torch')}; torchrpc {src.get('torchrpc')} from {src.get('torchrpc_path')}"
        if "torchrpc_commit" in src:
            line += f" at {src['torchrpc_commit']}"
            dirty = src.get("torchrpc_uncommitted")
            line += f" + uncommitted changes to {', '.join(dirty)}" if dirty else " (clean)"
        print(line, file=out)
    print("cells: median over rounds [min-max over rounds]; ratio = torchrpc median / torch median\n", file=out)
    compare = [r for r in rows if r["kind"] == "compare"]
    if compare:
        body = []
        for r in compare:
            ratio = r["ratio_torchrpc_over_torch"]
            body.append([f"{r['workload']} {r['name']}", f"{r['metric']} ({r['unit']})",
                         cell(r["torchrpc"]), cell(r["torch"]),
                         "-" if ratio is None else f"{ratio:.2f} ({r['better']} is better)", r["verdict"]])
        _table(["workload", "metric", "torchrpc", "torch", "torchrpc/torch", "faster"], body, out)

    refs = [r for r in compare if "one_process" in r]
    for r in refs:
        print(f"\n{r['workload']} against the same model in one process (plain autograd + SGD, 1 thread), "
              f"{r['metric']}:", file=out)
        body = [["one process", cell(r["one_process"]), ""]]
        for b in BACKENDS:
            ratio = r[f"ratio_{b}_over_one_process"]
            body.append([b, cell(r[b]), "-" if ratio is None else f"{b}/one-process = {ratio:.2f}"])
        _table(["", r["metric"], "ratio"], body, out)

    floors = [r for r in rows if r["kind"] == "floor"]
    if floors:
        print("\nfloors (no RPC library):", file=out)
        body = [[f"{r['workload']} {r['name']}", f"{r['metric']} ({r['unit']})", cell(r["floor"]), r["title"]]
                for r in floors]
        _table(["floor", "metric", "value", "what"], body, out)

    print("\nworkloads:", file=out)
    for wid, w in WORKLOADS.items():
        if any(r["workload"] == wid for r in compare):
            print(f"  {wid}: {w.title}", file=out)

    notes = [(wid, backend, i + 1, n) for (wid, backend), results in run.results.items()
             for i, r in enumerate(results) for n in r.notes]
    if notes:
        print("\nnotes:", file=out)
        for wid, backend, rnd, n in notes:
            print(f"  {wid} {backend} round {rnd}: {n}", file=out)

    failures = _failures(run)
    if failures:
        print(f"\nFAILURES ({len(failures)} distinct):", file=out)
        for (wid, backend, rounds), err in failures:
            lines = err.splitlines()
            if len(lines) > max_error_lines:
                lines = lines[:max_error_lines // 2] + [f"... ({len(lines) - max_error_lines} lines)"] + \
                    lines[-max_error_lines // 2:]
            print(f"\n== {wid} {backend}, round(s) {', '.join(map(str, rounds))}:", file=out)
            for ln in lines:
                print("   " + ln, file=out)


def _failures(run: BenchRun) -> list[tuple[tuple[str, str, list[int]], str]]:
    """Distinct failures: ((id, backend, rounds), error), identical errors across rounds merged."""
    merged: dict[tuple[str, str, str], list[int]] = {}
    for (wid, backend), results in run.results.items():
        for i, r in enumerate(results):
            if r.status != "ok":
                merged.setdefault((wid, backend, _normalize(r.error)), []).append(i + 1)
    out = []
    for (wid, backend, _), rounds in merged.items():
        err = next(r.error for i, r in enumerate(run.results[(wid, backend)]) if i + 1 == rounds[0])
        out.append(((wid, backend, rounds), err))
    return out


def _normalize(err: str) -> str:
    """An error without what changes between rounds (pids, ports, addresses, timings)."""
    return re.sub(r"0x[0-9a-f]+|\d+", "N", err.split("--- log of", 1)[0])


def failed(run: BenchRun) -> bool:
    return any(r.status != "ok" for results in run.results.values() for r in results)


def write_json(rows: list[dict], path: str) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
