#!/usr/bin/env python
"""Run PyTorch's own RPC test suites against torchrpc, with only the imports swapped.

    python conformance/run.py [--list] [-k PATTERN] [--timeout S] [--deadline S]
                              [--suite NAME ...] [--json PATH] [--keep]

At run time this copies the test modules shipped in the installed torch wheel
(torch/testing/_internal/distributed/rpc/{rpc_test,dist_autograd_test,dist_optimizer_test,
rpc_agent_test_fixture}.py and torch/testing/_internal/dist_utils.py) into a temporary
directory, rewrites their imports of torch.distributed.{rpc,autograd,optim,nn} to
torchrpc{,.autograd,.optim,.nn}, selects the tests that use only the public API (by reading
their code with ``ast``), mixes each suite with a torchrpc fixture the way torch's
rpc_utils.generate_tests does, and runs the selection with pytest (one pytest per suite),
each test under a timeout and the whole run under a global deadline.

Nothing of torch's test text is kept in this repository. See conformance/README.md.
"""
from __future__ import annotations

import argparse
import ast
import collections
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
EXPECTED_FAILURES_FILE = os.path.join(HERE, "expected_failures.txt")
# Test this checkout's torchrpc, whatever an editable install elsewhere points to.
REPO_SRC = os.path.join(os.path.dirname(HERE), "src")
if not os.path.isdir(os.path.join(REPO_SRC, "torchrpc")):
    REPO_SRC = None

# (generated module, suite class) pairs run by default, in this order.
SUITES = [
    ("cf_rpc_test", "RpcTest"),
    ("cf_dist_autograd_test", "DistAutogradTest"),
    ("cf_dist_optimizer_test", "DistOptimizerTest"),
]
# Run only when named with --suite: torch's TensorPipe-only suites, which hold its sparse-tensor
# tests (with -k sparse) among tests of TensorPipe's own options.
OPTIONAL_SUITES = [
    ("cf_rpc_test", "TensorPipeAgentRpcTest"),
    ("cf_dist_autograd_test", "TensorPipeAgentDistAutogradTest"),
]
# The wheel files copied (more are added when a copied file imports a sibling).
RPC_FILES = ["rpc_test", "dist_autograd_test", "dist_optimizer_test", "rpc_agent_test_fixture"]

RPC_FAMILY = [
    ("torch.distributed.rpc", "torchrpc"),
    ("torch.distributed.autograd", "torchrpc.autograd"),
    ("torch.distributed.optim", "torchrpc.optim"),
    ("torch.distributed.nn", "torchrpc.nn"),
]
LOCAL_PREFIX = "torch.testing._internal.distributed.rpc."
DIST_UTILS = "torch.testing._internal.dist_utils"

REASONS = ["faulty", "cuda", "jit", "debug", "internal", "private"]
#: modules whose use makes a test "internal" (as written in the wheel, and as rewritten)
INTERNAL_MODULES = ("torch.distributed.rpc.internal", "torch.distributed.rpc.api", "torchrpc.internal",
                    "torchrpc.api")
REASON_TEXT = {
    "faulty": "uses the faulty (fault-injecting) agent",
    "cuda": "uses CUDA, GPUs or device maps",
    "jit": "uses TorchScript",
    "debug": "reads _get_debug_info-like internals",
    "internal": "uses torch.distributed.rpc.internal / .api internals",
    "private": "uses an underscore (private) attribute",
}


# ----------------------------------------------------------------------------------------
# 1. Copy and rewrite
# ----------------------------------------------------------------------------------------

SUPPORT_SRC = '''\
"""Written by conformance/run.py: guarded imports for the rewritten torch test modules."""
import importlib

MISSING = []          # names a rewritten import asked for that torchrpc lacks


class TorchrpcMissingError(Exception):
    """Raised when a test uses something torchrpc does not provide (a placeholder)."""


class Missing:
    """Stands in for a name torchrpc lacks; fails when it is used, not when imported."""

    def __init__(self, name):
        object.__setattr__(self, "_cf_name", name)

    def _fail(self, *a, **k):
        raise TorchrpcMissingError(
            f"torchrpc has no {self._cf_name} (placeholder inserted by conformance/run.py)")

    __call__ = _fail
    __iter__ = _fail
    __enter__ = _fail

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return Missing(f"{self._cf_name}.{attr}")

    def __repr__(self):
        return f"<missing in torchrpc: {self._cf_name}>"


def _cf_module(name):
    try:
        return importlib.import_module(name)
    except ImportError:
        MISSING.append(name)
        return Missing(name)


def _cf_from(modname, names):
    try:
        mod = importlib.import_module(modname)
    except ImportError:
        mod = None
    out = []
    for n in names:
        if mod is not None and hasattr(mod, n):
            out.append(getattr(mod, n))
            continue
        if mod is not None:
            try:
                out.append(importlib.import_module(f"{modname}.{n}"))
                continue
            except ImportError:
                pass
        MISSING.append(f"{modname}.{n}")
        out.append(Missing(f"{modname}.{n}"))
    return tuple(out)
'''

FIXTURE_SRC = '''\
"""Written by conformance/run.py: torchrpc's fixture and the concrete test classes.

Mirrors torch/testing/_internal/distributed/rpc_utils.py (SpawnHelper, generate_tests) and
tensorpipe_rpc_agent_test_fixture.py, for torchrpc: env:// rendezvous on 127.0.0.1 with a
free MASTER_PORT per test, world size 4 (RpcAgentTestFixture's), torchrpc's options.
"""
import json
import os

import torch
import torchrpc as rpc
from torch.testing._internal.common_distributed import MultiProcessTestCase
from torch.testing._internal.common_utils import find_free_port

import cf_rpc_agent_test_fixture


class TorchrpcAgentTestFixture(cf_rpc_agent_test_fixture.RpcAgentTestFixture):
    @property
    def rpc_backend(self):
        return rpc.BackendType.TORCHRPC

    @property
    def init_method(self):
        return "env://"

    @property
    def rpc_backend_options(self):
        return rpc.TensorPipeRpcBackendOptions(init_method=self.init_method)

    def get_shutdown_error_regex(self):
        # As torch's TensorPipe fixture: any error.
        return "(.*)"

    def get_timeout_error_regex(self):
        # torchrpc's wording: "RPC to worker 'worker1' running f timed out after 1 s ..."
        return "timed out after"


START_METHOD = os.environ.get("CF_START_METHOD", "spawn")


class SpawnHelper(MultiProcessTestCase):
    def setUp(self):
        super().setUp()
        env = {{"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(find_free_port())}}
        os.environ.update(env)
        # The ranks read the rendezvous address from here too: a forkserver's children do
        # not see the parent's environment as it is now.
        with open(self.file_name + ".cfenv", "w") as f:
            json.dump(env, f)
        self._spawn_processes()

    def tearDown(self):
        super().tearDown()
        try:
            os.remove(self.file_name + ".cfenv")
        except OSError:
            pass

    def _spawn_processes(self):
        if START_METHOD == "spawn":  # torch's own way
            return super()._spawn_processes()
        ctx = torch.multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        self._start_processes(ctx.Process)

    @classmethod
    def _run(cls, rank, test_name, file_name, parent_pipe, **kwargs):
        with open(file_name + ".cfenv") as f:
            os.environ.update(json.load(f))
        super(SpawnHelper, cls)._run(rank, test_name, file_name, parent_pipe, **kwargs)


SUITES = {suites!r}

for _modname, _suite in SUITES:
    _mod = __import__(_modname)
    _cls = type(_suite, (getattr(_mod, _suite), TorchrpcAgentTestFixture, SpawnHelper), {{}})
    _cls.__module__ = __name__
    _cls.__qualname__ = _suite
    globals()[_suite] = _cls
del _mod, _cls
'''

CONFTEST_SRC = '''\
"""Written by conformance/run.py: keeps the selected tests, records each outcome."""
import json
import os

from torch.testing._internal import common_distributed

# shorter timeouts for expected failures that hang (see expected_failures.txt)
common_distributed.TIMEOUT_OVERRIDE.update(json.loads(os.environ.get("CF_TIMEOUTS", "{}")))


def pytest_collection_modifyitems(config, items):
    sel = os.environ.get("CF_SELECTED")
    if not sel:
        return
    with open(sel) as f:
        wanted = set(json.load(f))
    keep, drop = [], []
    for it in items:
        tid = it.nodeid.split("::", 1)[-1].replace("::", ".")
        (keep if tid in wanted else drop).append(it)
    items[:] = keep
    if drop:
        config.hook.pytest_deselected(items=drop)


def pytest_runtest_logreport(report):
    out = os.environ.get("CF_OUTCOMES")
    if not out:
        return
    tid = report.nodeid.split("::", 1)[-1].replace("::", ".")
    rec = {"test": tid, "when": report.when, "outcome": report.outcome,
           "duration": round(report.duration, 2)}
    if report.outcome != "passed":
        text = report.longreprtext or ""
        rec["longrepr"] = text[-30000:]
    with open(out, "a") as f:
        f.write(json.dumps(rec) + "\\n")
'''


def map_rpc_module(name):
    for old, new in RPC_FAMILY:
        if name == old or name.startswith(old + "."):
            return new + name[len(old):]
    return None


class Rewriter:
    """Rewrites one wheel module; records what its imports ask of torchrpc."""

    def __init__(self, local_names):
        self.local_names = set(local_names)  # sibling modules copied (without cf_ prefix)
        self.missing = []                     # (module, name) that torchrpc lacks
        self.bindings = {}                    # module-level name -> torchrpc module it came from
        self.needs = set()                    # sibling modules imported (for the copy closure)

    def map_local(self, name):
        if name == DIST_UTILS:
            self.needs.add("dist_utils")
            return "cf_dist_utils"
        if name.startswith(LOCAL_PREFIX):
            rest = name[len(LOCAL_PREFIX):]
            if "." not in rest:
                self.needs.add(rest)
                return "cf_" + rest
        return None

    def check(self, modname, names=None):
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            self.missing.append((modname, None))
            return
        for n in names or []:
            if hasattr(mod, n):
                continue
            try:
                importlib.import_module(f"{modname}.{n}")
            except ImportError:
                self.missing.append((modname, n))

    def replace_import(self, node, top_level):
        """One line of code replacing the import, or None to keep it as it is."""
        if isinstance(node, ast.Import):
            parts, changed = [], False
            for a in node.names:
                new = map_rpc_module(a.name)
                if new is not None:
                    changed = True
                    self.check(new)
                    if a.asname:
                        parts.append(f'{a.asname} = _cf_module("{new}")')
                        if top_level:
                            self.bindings[a.asname] = new
                    else:  # binds "torch"; torch.distributed.X.attr becomes torchrpc.X.attr
                        parts.append(f'import torch; _cf_module("{new}")')
                    continue
                loc = self.map_local(a.name)
                if loc is not None:
                    changed = True
                    parts.append(f"import {loc} as {a.asname}" if a.asname else f"import torch, {loc}")
                    continue
                parts.append(f"import {a.name} as {a.asname}" if a.asname else f"import {a.name}")
            return "; ".join(parts) if changed else None
        if node.level:
            return None
        mod = node.module or ""
        new = map_rpc_module(mod)
        if new is not None:
            if any(a.name == "*" for a in node.names):
                return f"from {new} import *"
            self.check(new, [a.name for a in node.names])
            targets = [a.asname or a.name for a in node.names]
            if top_level:
                for t in targets:
                    self.bindings[t] = new
            names = ", ".join(f'"{a.name}"' for a in node.names)
            return f'{", ".join(targets)}, = _cf_from("{new}", ({names},))'
        loc = self.map_local(mod)
        if loc is not None:
            names = ", ".join(f"{a.name} as {a.asname}" if a.asname else a.name for a in node.names)
            return f"from {loc} import {names}"
        if mod == "torch.distributed":
            parts, changed, rest = [], False, []
            for a in node.names:
                sub = map_rpc_module(f"torch.distributed.{a.name}")
                if sub is not None:
                    changed = True
                    self.check(sub)
                    parts.append(f'{a.asname or a.name} = _cf_module("{sub}")')
                    if top_level:
                        self.bindings[a.asname or a.name] = sub
                else:
                    rest.append(f"{a.name} as {a.asname}" if a.asname else a.name)
            if rest:
                parts.insert(0, f"from torch.distributed import {', '.join(rest)}")
            return "; ".join(parts) if changed else None
        return None

    def rewrite(self, src):
        tree = ast.parse(src)
        lines = src.split("\n")
        top = set(id(n) for n in tree.body)
        spans = {}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                code = self.replace_import(node, id(node) in top)
                if code is not None:
                    spans[node.lineno - 1] = (node, code)
        out, i = [], 0
        attr_subs = [(re.compile(r"(?<![\w.])" + re.escape(old) + r"\b"), new) for old, new in RPC_FAMILY]
        dist_utils_re = re.compile(r"(?<![\w.])" + re.escape(DIST_UTILS) + r"\b")
        local_re = re.compile(r"(?<![\w.])" + re.escape(LOCAL_PREFIX) + r"(\w+)\b")

        def local_sub(m):
            if m.group(1) in self.local_names:
                self.needs.add(m.group(1))
                return "cf_" + m.group(1)
            return m.group(0)

        while i < len(lines):
            if i in spans:
                node, code = spans[i]
                first, last = lines[i], lines[node.end_lineno - 1]
                head, tail = first[: node.col_offset], last[node.end_col_offset:]
                out.append(head + code + tail)
                for _ in range(node.lineno, node.end_lineno):
                    out.append("")  # keep line numbers as in the wheel
                i = node.end_lineno
                continue
            line = lines[i]
            if "torch." in line:
                for rx, new in attr_subs:
                    line = rx.sub(new, line)
                line = dist_utils_re.sub("cf_dist_utils", line)
                line = local_re.sub(local_sub, line)
            out.append(line)
            i += 1
        prelude = ('import torchrpc; from cf_support import _cf_from, _cf_module; '
                   '_cf_module("torchrpc.autograd"); _cf_module("torchrpc.optim"); _cf_module("torchrpc.nn")  ')
        first = out[0].strip()
        if not first or first.startswith("#"):
            out[0] = prelude + out[0]
        else:
            out[0] = prelude.rstrip() + "; " + out[0]
        return "\n".join(out)


def wheel_paths():
    import torch.testing._internal.distributed.rpc as p
    rpc_dir = p.__path__[0]
    internal = os.path.dirname(os.path.dirname(rpc_dir))
    return rpc_dir, internal


def generate(workdir, suites):
    """Copies and rewrites the wheel's modules into workdir; returns {module: Rewriter}."""
    rpc_dir, internal = wheel_paths()
    local_names = [f[:-3] for f in os.listdir(rpc_dir) if f.endswith(".py") and f != "__init__.py"]
    todo = list(RPC_FILES) + ["dist_utils"]
    done = {}
    while todo:
        name = todo.pop(0)
        if name in done:
            continue
        path = os.path.join(internal, "dist_utils.py") if name == "dist_utils" else os.path.join(rpc_dir, name + ".py")
        with open(path) as f:
            src = f.read()
        rw = Rewriter(local_names)
        new_src = rw.rewrite(src)
        with open(os.path.join(workdir, f"cf_{name}.py"), "w") as f:
            f.write(f"{new_src}\n# generated by conformance/run.py from {path}\n")
        done[name] = rw
        todo.extend(sorted(rw.needs - set(done)))
    with open(os.path.join(workdir, "cf_support.py"), "w") as f:
        f.write(SUPPORT_SRC)
    with open(os.path.join(workdir, "test_conformance.py"), "w") as f:
        f.write(FIXTURE_SRC.format(suites=suites))
    with open(os.path.join(workdir, "conftest.py"), "w") as f:
        f.write(CONFTEST_SRC)
    with open(os.path.join(workdir, "pytest.ini"), "w") as f:
        f.write("[pytest]\naddopts =\n")
    return done


# ----------------------------------------------------------------------------------------
# 2. Select by reading the code
# ----------------------------------------------------------------------------------------

def split_ident(s):
    parts = []
    for p in re.split(r"[^A-Za-z0-9]+", s):
        parts += [w.lower() for w in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z0-9]+", p)]
    return parts


ALLOWED_PRIVATE_ATTRS = {"_values", "_indices", "_nnz"}  # sparse-tensor accessors: torch's, not RPC's


class Selector:
    def __init__(self, workdir, rewriters):
        self.mod_ast = {}
        self.rewriters = rewriters
        for name in rewriters:
            with open(os.path.join(workdir, f"cf_{name}.py")) as f:
                self.mod_ast["cf_" + name] = ast.parse(f.read())
        self.module_defs = {
            m: {n.name: n for n in t.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
            for m, t in self.mod_ast.items()
        }
        self.dist_utils_defs = self.module_defs.get("cf_dist_utils", {})
        self.dist_utils_names = set()  # names the test modules import from cf_dist_utils
        for t in self.mod_ast.values():
            for n in t.body:
                if isinstance(n, ast.ImportFrom) and n.module == "cf_dist_utils":
                    self.dist_utils_names |= {a.asname or a.name for a in n.names}
        self.dist_utils_names.discard("dist_init")  # the harness itself, not a test helper
        self.evidence = {}

    def class_node(self, cls):
        defs = self.module_defs.get(cls.__module__)
        if defs is None:
            return None
        n = defs.get(cls.__name__)
        return n if isinstance(n, ast.ClassDef) else None

    def methods_in_mro(self, cls):
        """name -> FunctionDef, first definition along cls's MRO (only the generated modules)."""
        found = {}
        for c in cls.__mro__:
            node = self.class_node(c)
            if node is None:
                continue
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name not in found:
                    found[item.name] = (c.__module__, item)
        return found

    @staticmethod
    def is_suite(node):
        """A test-suite class (RpcTest, CudaRpcTest, ...): never scanned as a helper."""
        if not isinstance(node, ast.ClassDef):
            return False
        bases = " ".join(ast.unparse(b) for b in node.bases)
        return node.name.endswith("Test") or "Fixture" in bases or "TestCommon" in node.name \
            or "Test" in bases

    def helpers(self, module, node, methods, class_names):
        """The nodes a test obviously uses, one level deep."""
        out = []
        defs = self.module_defs[module]
        seen = set()
        for sub in ast.walk(node):
            key = None
            if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and \
                    (sub.value.id in ("self", "cls") or sub.value.id in class_names):
                if sub.attr in methods:
                    key = ("m", sub.attr)
                    target = methods[sub.attr]
            elif isinstance(sub, ast.Name):
                if sub.id in defs and not self.is_suite(defs[sub.id]):
                    key = ("d", sub.id)
                    target = (module, defs[sub.id])
                elif sub.id in self.dist_utils_names and sub.id in self.dist_utils_defs:
                    key = ("u", sub.id)
                    target = ("cf_dist_utils", self.dist_utils_defs[sub.id])
            if key and key not in seen and target[1] is not node:
                seen.add(key)
                out.append(target)
        return out

    def reason(self, module, node, class_names):
        bindings = self.rewriters[module[3:]].bindings if module[3:] in self.rewriters else {}
        idents, strings = [], []
        chains = []
        found_imports: list = []
        walk_roots = [node] + list(getattr(node, "decorator_list", []))
        for root in walk_roots:
            for sub in ast.walk(root):
                if isinstance(sub, ast.Name):
                    idents.append(sub.id)
                elif isinstance(sub, ast.Attribute):
                    idents.append(sub.attr)
                    chain, v = [sub.attr], sub.value
                    while isinstance(v, ast.Attribute):
                        chain.append(v.attr)
                        v = v.value
                    if isinstance(v, ast.Name):
                        chain.append(v.id)
                        chains.append(list(reversed(chain)))
                elif isinstance(sub, ast.keyword) and sub.arg:
                    idents.append(sub.arg)
                elif isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    idents.append(sub.name)
                elif isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    strings.append(sub.value)
                elif isinstance(sub, (ast.Import, ast.ImportFrom)):
                    # an import inside the test itself (``import torch.distributed.rpc.internal as x``)
                    mods = [a.name for a in sub.names] if isinstance(sub, ast.Import) else [sub.module or ""]
                    for mod in mods:
                        if mod.startswith(INTERNAL_MODULES):
                            found_imports.append(mod)
        words = set()
        for s in idents:
            words.update(split_ident(s))
        low_idents = [s.lower() for s in idents]
        low_strings = [s.lower() for s in strings]
        found = {}

        def hit(reason, evidence):
            found.setdefault(reason, evidence)

        for s in idents + strings:
            if "faulty" in s.lower():
                hit("faulty", s)
        for s in idents:
            if set(split_ident(s)) & {"cuda", "gpu", "gpus"} or \
                    s in ("device_maps", "device_map", "set_device_map", "devices", "set_devices"):
                hit("cuda", s)
            w = split_ident(s)
            if set(w) & {"jit", "torchscript"} or any(x.startswith("script") for x in w):
                hit("jit", s)
            if "debug_info" in s.lower():
                hit("debug", s)
            src = bindings.get(s)
            if src and src.startswith(("torchrpc.internal", "torchrpc.api")):
                hit("internal", f"{s} (from {src})")
            elif src and s.startswith("_"):
                hit("private", f"{s} (from {src})")
        for s in strings:
            if "cuda" in s.lower():
                hit("cuda", repr(s))
        for mod in found_imports + [s for s in strings if s.startswith(INTERNAL_MODULES)]:
            hit("internal", f"import {mod}")  # (the rewriter turns such an import into _cf_module("..."))
        for chain in chains:
            dotted = ".".join(chain)
            if dotted.startswith(("torchrpc.internal", "torchrpc.api")) or \
                    bindings.get(chain[0], "").startswith(("torchrpc.internal", "torchrpc.api")):
                hit("internal", dotted)
            base = chain[0]
            if base in ("self", "cls") or base in class_names or chain[:3] == ["torch", "testing", "_internal"]:
                continue
            for part in chain[1:]:
                if part.startswith("_") and not part.startswith("__") and part not in ALLOWED_PRIVATE_ATTRS:
                    hit("private", dotted)
        for r in REASONS:
            if r in found:
                return r, found[r]
        return None, None

    def select(self, cls):
        """[(test name, reason or None)] for a concrete class."""
        import unittest
        names = unittest.TestLoader().getTestCaseNames(cls)
        methods = self.methods_in_mro(cls)
        class_names = {c.__name__ for c in cls.__mro__}
        for m in self.module_defs.values():
            class_names |= {n for n, d in m.items() if isinstance(d, ast.ClassDef)}
        result = []
        for name in names:
            if name not in methods:
                result.append((name, None))
                continue
            module, node = methods[name]
            r, ev = self.reason(module, node, class_names)
            if r is None:
                for hmod, hnode in self.helpers(module, node, methods, class_names):
                    r, ev = self.reason(hmod, hnode, class_names)
                    if r:
                        ev = f"{ev} in {hnode.name}"
                        break
            self.evidence[(cls.__name__, name)] = ev
            result.append((name, r))
        return result


# ----------------------------------------------------------------------------------------
# 3. Run and report
# ----------------------------------------------------------------------------------------

def read_expected_failures(path=EXPECTED_FAILURES_FILE):
    """{Suite.test: reason}; a reason may start with ``(timeout N)``: the test hangs on torchrpc,
    so it runs under N seconds instead of the usual timeout."""
    out = {}
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            test, _, reason = line.partition("#")
            test = test.strip()
            if test:
                out[test] = reason.strip()
    return out


def hang_timeouts(expected):
    """{test name: seconds} of the expected failures marked ``(timeout N)``."""
    out = {}
    for tid, reason in expected.items():
        m = re.match(r"\(timeout (\d+)\)", reason)
        if m:
            out[tid.split(".")[-1]] = int(m.group(1))
    return out


def error_summary(longrepr):
    """The last exception line(s) of a failure, as a short one-line summary."""
    if not longrepr:
        return ""
    if re.search(r"Failed: Timeout >", longrepr):
        return "pytest-timeout: the test ran past its timeout"
    m = re.findall(r"Process \d+ terminated or timed out after [\d.]+ seconds", longrepr)
    if m:
        return m[0]
    # Errors piped back from the ranks: "Process i exited with error code 10 and exception:\n<tb>"
    tbs = re.split(r"Process \d+ exited with error code \d+ and exception:\n", longrepr)
    cands = []
    for tb in tbs[1:] if len(tbs) > 1 else [longrepr]:
        lines = [l for l in tb.strip().split("\n") if l.strip()]
        for l in reversed(lines):
            if re.match(r"^(E\s+)?[\w.]*(Error|Exception|Exit|Interrupt|Missing\w*)\b.*", l.strip()) or \
                    re.match(r"^[\w.]+: ", l.strip()):
                cands.append(l.strip())
                break
    if not cands:
        lines = [l for l in longrepr.strip().split("\n") if l.strip()]
        cands = lines[-1:]
    s = cands[0]
    s = re.sub(r"^E\s+", "", s)
    return s[:300]


def run_suite(workdir, suite, selected, timeout, deadline_at, outcomes_path, start_method):
    sel_path = os.path.join(workdir, f"selected_{suite}.json")
    with open(sel_path, "w") as f:
        json.dump([f"{suite}.{t}" for t in selected], f)
    env = dict(os.environ)
    env["CF_SELECTED"] = sel_path
    env["CF_OUTCOMES"] = outcomes_path
    env["CF_START_METHOD"] = start_method
    env["DISTRIBUTED_TESTS_DEFAULT_TIMEOUT"] = str(int(timeout))
    env["CF_TIMEOUTS"] = json.dumps(hang_timeouts(read_expected_failures()))
    env["PYTHONPATH"] = os.pathsep.join(
        [workdir] + ([REPO_SRC] if REPO_SRC else []) + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("PYTHONUNBUFFERED", "1")
    cmd = [sys.executable, "-m", "pytest", "-c", os.path.join(workdir, "pytest.ini"),
           "--rootdir", workdir, "-p", "no:cacheprovider", "-q", "-rN",
           f"--timeout={int(timeout) + 60}", "--timeout-method=signal",
           f"test_conformance.py::{suite}"]
    log_path = os.path.join(workdir, f"pytest_{suite}.log")
    remaining = deadline_at - time.time()
    if remaining <= 5:
        return "deadline", log_path
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=remaining)
            status = "done"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # the pytest we started and its ranks
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            status = "deadline"
    return status, log_path


def collect(outcomes_path):
    """test id -> {'outcome': passed/failed/error/skipped, 'duration', 'longrepr'}."""
    res = {}
    if not os.path.exists(outcomes_path):
        return res
    with open(outcomes_path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            cur = res.setdefault(r["test"], {"outcome": None, "duration": 0.0, "longrepr": ""})
            cur["duration"] += r.get("duration", 0.0)
            if r["when"] == "call":
                if cur["outcome"] != "error":
                    cur["outcome"] = r["outcome"]
            elif r["outcome"] == "failed":
                cur["outcome"] = "error"
            elif r["outcome"] == "skipped" and cur["outcome"] is None:
                cur["outcome"] = "skipped"
            if r.get("longrepr") and r["outcome"] != "passed":
                cur["longrepr"] = (cur["longrepr"] + "\n" + r["longrepr"]).strip()
    for v in res.values():
        if v["outcome"] is None:
            v["outcome"] = "error"
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="list every test with its selection, run nothing")
    ap.add_argument("-k", dest="pattern", help="run only selected tests whose 'Suite.test' matches this regex")
    ap.add_argument("--timeout", type=float, default=60, help="seconds per test (default 60)")
    ap.add_argument("--deadline", type=float, default=1500, help="seconds for the whole run (default 1500)")
    ap.add_argument("--suite", action="append", choices=[s for _, s in SUITES + OPTIONAL_SUITES],
                    help="run only this suite (may repeat); " + ", ".join(s for _, s in OPTIONAL_SUITES) +
                         " run only when named")
    ap.add_argument("--json", dest="json_path", help="write per-test outcomes to this JSON file")
    ap.add_argument("--start-method", choices=["spawn", "forkserver"], default="spawn",
                    help="how the ranks start: spawn (torch's MultiProcessTestCase, default) or "
                         "forkserver (forked from a server that has imported the tests: faster)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (its path is printed)")
    ap.add_argument("--workdir", help="generate into this directory instead of a temporary one")
    args = ap.parse_args(argv)
    t0 = time.time()
    deadline_at = t0 + args.deadline

    try:
        import expecttest  # noqa: F401  (torch.testing._internal.common_utils needs it)
        import pytest_timeout  # noqa: F401
    except ImportError as e:
        print(f"conformance: missing test dependency: {e}. pip install expecttest pytest-timeout", file=sys.stderr)
        return 2

    if REPO_SRC:
        sys.path.insert(0, REPO_SRC)
    suites = [(m, s) for m, s in SUITES + OPTIONAL_SUITES
              if (s in args.suite if args.suite else (m, s) in SUITES)]
    workdir = args.workdir or tempfile.mkdtemp(prefix="torchrpc-conformance-")
    os.makedirs(workdir, exist_ok=True)
    try:
        rewriters = generate(workdir, suites)
        sys.path.insert(0, workdir)
        try:
            import test_conformance as tc
        except Exception as e:  # a rewritten module that does not even import
            print(f"conformance: the rewritten test modules fail to import: {type(e).__name__}: {e}")
            raise
        import cf_support

        print(f"torch {__import__('torch').__version__}; test modules copied from {wheel_paths()[0]}")
        print(f"generated in {workdir}; torchrpc from {os.path.dirname(importlib.import_module('torchrpc').__file__)}")
        missing = sorted({f"{m}.{n}" if n else m for rw in rewriters.values() for m, n in rw.missing})
        print(f"\nimports torchrpc lacks ({len(missing)}; replaced by placeholders that fail when used):")
        for m in missing:
            print(f"  {m}")

        sel = Selector(workdir, rewriters)
        expected = read_expected_failures()
        plan = {}     # suite -> [(test, reason)]
        for _, suite in suites:
            plan[suite] = sel.select(getattr(tc, suite))

        print("\nselection (public API only; reasons: " + ", ".join(REASONS) + ")")
        print(f"  {'suite':<22}{'found':>7}{'selected':>10}   left out by reason")
        reason_totals = collections.Counter()
        for suite, items in plan.items():
            c = collections.Counter(r for _, r in items if r)
            reason_totals.update(c)
            n_sel = sum(1 for _, r in items if r is None)
            print(f"  {suite:<22}{len(items):>7}{n_sel:>10}   " +
                  ", ".join(f"{r} {c[r]}" for r in REASONS if c[r]))
        print(f"  {'total':<22}{sum(len(v) for v in plan.values()):>7}"
              f"{sum(1 for v in plan.values() for _, r in v if r is None):>10}   " +
              ", ".join(f"{r} {reason_totals[r]}" for r in REASONS if reason_totals[r]))
        for r in REASONS:
            print(f"    {r:<9} {REASON_TEXT[r]}")

        if args.list:
            for suite, items in plan.items():
                print(f"\n{suite}:")
                for t, r in items:
                    xf = "  (expected failure)" if f"{suite}.{t}" in expected else ""
                    ev = f"  [{sel.evidence.get((suite, t))}]" if r else ""
                    print(f"  {'selected ' if r is None else 'left out '} {r or '':<9} {t}{xf}{ev}")
            return 0

        # --- run
        to_run = {}
        for suite, items in plan.items():
            names = [t for t, r in items if r is None]
            if args.pattern:
                names = [t for t in names if re.search(args.pattern, f"{suite}.{t}")]
            to_run[suite] = names
        outcomes_path = os.path.join(workdir, "outcomes.jsonl")
        statuses = {}
        for suite, names in to_run.items():
            if not names:
                statuses[suite] = "empty"
                continue
            ts = time.time()
            print(f"\nrunning {suite}: {len(names)} tests (timeout {args.timeout:g} s each, "
                  f"{max(0, deadline_at - ts):.0f} s left of the deadline) ...", flush=True)
            status, log_path = run_suite(workdir, suite, names, args.timeout, deadline_at, outcomes_path,
                                         args.start_method)
            statuses[suite] = status
            done = collect(outcomes_path)
            n_done = sum(1 for t in names if f"{suite}.{t}" in done)
            print(f"  {status}: {n_done}/{len(names)} ran in {time.time() - ts:.0f} s (pytest log: {log_path})",
                  flush=True)

        results = collect(outcomes_path)
        per_test = {}
        for suite, names in to_run.items():
            for t in names:
                tid = f"{suite}.{t}"
                r = results.get(tid)
                outcome = r["outcome"] if r else "not-run"
                entry = {"suite": suite, "test": t, "outcome": outcome,
                         "duration": round(r["duration"], 2) if r else None}
                if tid in expected:
                    entry["expected_failure"] = expected[tid]
                    if outcome in ("failed", "error"):
                        entry["outcome"] = "xfail"
                    elif outcome == "passed":
                        entry["outcome"] = "xpass"
                if r and r["longrepr"] and outcome not in ("passed",):
                    entry["summary"] = error_summary(r["longrepr"])
                    entry["longrepr"] = r["longrepr"]
                per_test[tid] = entry

        # --- report
        cols = ["selected", "passed", "failed", "error", "skipped", "xfail", "xpass", "not-run"]
        print(f"\n{'suite':<22}" + "".join(f"{c:>9}" for c in cols))
        tot = collections.Counter()
        for suite, names in to_run.items():
            c = collections.Counter(per_test[f"{suite}.{t}"]["outcome"] for t in names)
            c["selected"] = len(names)
            tot.update(c)
            print(f"{suite:<22}" + "".join(f"{c[k]:>9}" for k in cols))
        print(f"{'total':<22}" + "".join(f"{tot[k]:>9}" for k in cols))
        print("(failed: an assertion or exception in the test; error: in set-up/tear-down; "
              "xfail: expected failure; xpass: expected to fail but passed)")

        bad = [e for e in per_test.values() if e["outcome"] in ("failed", "error", "xpass", "not-run", "skipped")]
        if bad:
            print("\nnot passing:")
            for e in sorted(bad, key=lambda e: (e["outcome"], e["suite"], e["test"])):
                print(f"  {e['outcome']:<8} {e['suite']}.{e['test']}: {e.get('summary', '')}")
        for s, st in statuses.items():
            if st == "deadline":
                print(f"\n{s}: stopped by the global deadline ({args.deadline:g} s)")
        elapsed = time.time() - t0
        print(f"\nfound {sum(len(v) for v in plan.values())}, selected {sum(len(v) for v in to_run.values())}, "
              f"passed {tot['passed']}, failed {tot['failed'] + tot['error']}, skipped {tot['skipped']}, "
              f"expected failures {tot['xfail']}, unexpected passes {tot['xpass']}, not run {tot['not-run']} "
              f"in {elapsed:.0f} s")

        if args.json_path:
            with open(args.json_path, "w") as f:
                json.dump({
                    "torch": __import__("torch").__version__,
                    "elapsed_s": round(elapsed, 1),
                    "missing_imports": missing,
                    "selection": {s: [{"test": t, "left_out": r} for t, r in items] for s, items in plan.items()},
                    "suite_status": statuses,
                    "totals": {k: tot[k] for k in cols},
                    "tests": per_test,
                }, f, indent=1)
            print(f"wrote {args.json_path}")
        ok = all(e["outcome"] in ("passed", "xfail") for e in per_test.values())
        return 0 if ok else 1
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
