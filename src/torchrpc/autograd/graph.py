"""Render a context's cross-worker autograd graph as Graphviz DOT (and PNG where ``dot`` exists).

Each worker describes its part of the context: the autograd nodes reachable from its
sends and from the recv tensors it holds, the recvs and sends themselves, and the
workers it exchanged tensors with. The caller gathers the descriptions from every
worker the context reached and draws one cluster per worker, with the send/recv
pairs as dashed edges between clusters (in the backward direction: recv -> send).
"""
from __future__ import annotations

import shutil
import subprocess
from typing import Any, Optional

from .. import api, current
from ..protocol.autograd_engine import walk


def describe(context_id: int) -> dict[str, Any]:
    """This worker's part of ``context_id``: nodes, edges, sends, recvs, peers."""
    agent = current.agent()
    ctx = agent.autograd.contexts.get(context_id)
    with ctx.lock:
        sends = {ag: list(ex.edges or []) for ag, ex in ctx.sends.items()}
        recvs = {ag: [t for t in ex.tensors] for ag, ex in ctx.recvs.items()}
        peers = sorted(ctx.known_workers)
        starts = [e for edges in sends.values() for e in edges]
        for state in ctx.passes.values():
            starts.extend(state.roots or [])
    inner, sinks = walk(starts)
    nodes: dict[int, str] = {}
    edges: list[tuple[int, int]] = []
    for n in inner:
        nodes[id(n)] = type(n).__name__
        for nxt, _ in n.next_functions:
            if nxt is not None:
                edges.append((id(n), id(nxt)))
    recv_of = {id(t): ag for ag, ts in recvs.items() for t in ts}
    for s in sinks:
        v = s.variable
        nodes[id(s)] = f"recv {recv_of[id(v)]:x}" if id(v) in recv_of else f"leaf {tuple(v.shape)}"
    send_nodes = {ag: [id(e[0]) for e in edges] for ag, edges in sends.items()}
    recv_nodes: dict[int, list[int]] = {}
    for s in sinks:
        if id(s.variable) in recv_of:
            recv_nodes.setdefault(recv_of[id(s.variable)], []).append(id(s))
    return {"worker": agent.name, "nodes": nodes, "edges": edges, "sends": send_nodes,
            "recvs": {ag: recv_nodes.get(ag, []) for ag in recvs}, "peers": [agent.peers.name_of(p) for p in peers]}


def to_dot(context_id: int) -> str:
    """The DOT source of the context's graph across all the workers it reached."""
    me = current.agent().name
    parts: dict[str, dict[str, Any]] = {}
    todo = [me]
    while todo:
        w = todo.pop()
        if w in parts:
            continue
        parts[w] = describe(context_id) if w == me else api.rpc_sync(w, describe, args=(context_id,))
        todo.extend(p for p in parts[w]["peers"] if p not in parts)
    lines = [f'digraph "context {context_id}" {{', "  rankdir=TB; node [shape=box, fontsize=10];"]
    for i, (w, part) in enumerate(sorted(parts.items())):
        lines.append(f'  subgraph "cluster_{w}" {{ label="{w}"; style=rounded;')
        for nid, label in part["nodes"].items():
            lines.append(f'    "{w}:{nid}" [label="{label}"];')
        for ag, ids in part["sends"].items():
            lines.append(f'    "{w}:send:{ag}" [label="send {ag:x}", shape=ellipse];')
            for nid in ids:
                if nid is not None:
                    lines.append(f'    "{w}:send:{ag}" -> "{w}:{nid}";')
        for a, b in part["edges"]:
            lines.append(f'    "{w}:{a}" -> "{w}:{b}";')
        lines.append("  }")
    for w, part in sorted(parts.items()):
        for ag, ids in part["recvs"].items():
            for owner, other in parts.items():
                if ag in other["sends"]:
                    for nid in ids:
                        lines.append(f'  "{w}:{nid}" -> "{owner}:send:{ag}" [style=dashed, color=blue];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def graph(context_id: int, png: Optional[str] = None) -> str:
    """The context's cross-worker autograd graph as DOT; also a PNG at ``png`` if Graphviz's
    ``dot`` is installed (returns the DOT source either way)."""
    dot = to_dot(context_id)
    if png is not None and shutil.which("dot"):
        subprocess.run(["dot", "-Tpng", "-o", png], input=dot.encode(), check=True, timeout=60)
    return dot
