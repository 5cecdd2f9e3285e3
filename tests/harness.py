"""Multi-process test harness for torchrpc.

Every multi-process test goes through this module. Workers are fresh
processes forked from a single ``forkserver`` that has already imported
torch, numpy, pytest (and torchrpc when it is importable), so starting a
worker costs a fork, not a ~1 s ``import torch``. Each worker gets its own
process, so each test starts from clean global state.

Public API
----------
``run_workers(fn, world_size, *, args=(), timeout=60, env=None, port=None, allow_errors=False)``
    Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes and
    return their return values ordered by rank. Raises :class:`WorkerFailed`
    if any rank raises, dies, logs an error (see below), or the run does not
    finish within ``timeout`` seconds. On a timeout the hung workers' Python
    stacks (all threads) are dumped and included in the error, then the
    workers are SIGKILLed.

``start_workers(fn, world_size, *, args=(), env=None, port=None, allow_errors=False)``
    Same, but returns a :class:`WorkerGroup` at once so a test can act on
    running workers, e.g. ``group.kill(1)`` to simulate a peer dying.
    ``group.join(timeout)`` returns the results; a rank killed through
    ``group.kill`` reports :data:`KILLED`. Use it as a context manager: every
    worker still alive on exit is killed.

``free_port()``
    A TCP port on 127.0.0.1 that is free now and has not been handed out
    earlier in this session.

``get_context()``
    The forkserver multiprocessing context, for tests that need
    ``Event``/``Queue``/``Barrier`` objects to pass to workers via ``args``.

Rules for ``fn``
----------------
* It must be a module-level function (pickled by reference); so must
  everything in ``args`` be picklable.
* Its return value is sent back with plain :mod:`pickle` (tensors are copied,
  not shared), so return small things.
* In the worker, ``os.environ`` is the parent's environment at the time of the
  call, plus MASTER_ADDR=127.0.0.1, MASTER_PORT, RANK, WORLD_SIZE,
  LOCAL_RANK, plus ``env``. (Variables that torch reads at import time were
  already read when the forkserver imported torch.)
* The worker's stdout/stderr (fd 1 and 2, so native output too) goes to a
  per-rank log file; the parent copies it to its own ``sys.stderr`` after the
  run (pytest shows it for failing tests) and puts its tail in
  :class:`WorkerFailed` messages.

Logged errors
-------------
torchrpc reports bugs it cannot raise to a caller (an exception in a handler
or a reader thread) only by logging them at ERROR on the ``torchrpc`` logger.
Each worker records every record of level ERROR or above that reaches the
``torchrpc`` logger (its children included) while ``fn`` runs, and reports
them with its result. A rank that returned normally but logged such records
fails as ``LoggedError``, naming the rank and quoting the records; a rank
that failed anyway gets them added to its report. A test that provokes logged
errors on purpose passes ``allow_errors=True`` (to ``run_workers`` or
``start_workers``), which keeps the records in the worker's output only.
Recording does not change what is printed: with no handler of its own
configured, a record still goes to stderr, i.e. to the rank's log.

Failure handling
----------------
When a rank fails (raises or dies) the others get ``fail_fast_grace`` seconds
(5 s) to finish on their own; then they are stack-dumped and killed, so a
failure on one rank does not turn into a long wait for the timeout on the
others (the usual case: the peer is blocked in ``shutdown()``).
"""

from __future__ import annotations

import atexit
import dataclasses
import faulthandler
import importlib
import importlib.util
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import weakref
from typing import Any, Callable, Iterable, Sequence

__all__ = [
    "KILLED",
    "WorkerError",
    "WorkerFailed",
    "WorkerGroup",
    "free_port",
    "get_context",
    "infrastructure_pids",
    "run_workers",
    "start_workers",
]

MASTER_ADDR = "127.0.0.1"

# Modules imported once in the forkserver so that forked workers inherit them.
_PRELOAD_ALWAYS = ["torch", "numpy"]
# Imported in the forkserver too when installed (test modules import them, so
# each worker would otherwise import them again when it unpickles ``fn``).
_PRELOAD_OPTIONAL = ["torch.distributed.rpc", "pytest", "hypothesis"]
# The package under test: preloaded only if it imports cleanly in the parent
# (the forkserver only tolerates ImportError; a SyntaxError half-way through
# an edit would kill it and every test with it).
_PRELOAD_GUARDED = ["torchrpc"]

_OUTPUT_TAIL_CHARS = 4000
# Logged errors a worker reports: at most this many records, each cut to this size.
_LOGGED_ERRORS_MAX = 20
_LOGGED_ERROR_CHARS = 3000
_LOGGED_ERRORS_LOGGER = "torchrpc"
_DUMP_WAIT_S = 1.5
_FAIL_FAST_GRACE_S = 5.0


# --------------------------------------------------------------------------
# Public result types
# --------------------------------------------------------------------------


class _KilledType:
    """Sentinel type of :data:`KILLED`."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "KILLED"

    def __reduce__(self):
        return (_KilledType, ())


#: Result of a rank that the test killed through :meth:`WorkerGroup.kill`.
KILLED = _KilledType()


@dataclasses.dataclass
class WorkerError:
    """What a failed rank reported (or what is known about how it died)."""

    rank: int
    type_name: str  # exception type name, or "Died" / "TimedOut" / "Aborted" / "LoggedError"
    traceback: str  # formatted traceback or explanation
    exitcode: int | None = None
    stack_dump: str = ""  # faulthandler dump taken before the kill, if any
    output: str = ""  # tail of the worker's stdout/stderr

    def format(self) -> str:
        parts = [f"--- rank {self.rank}: {self.type_name} (exitcode={self.exitcode}) ---",
                 self.traceback.rstrip()]
        if self.stack_dump:
            parts += [f"--- rank {self.rank}: Python stacks when killed ---",
                      self.stack_dump.rstrip()]
        if self.output:
            parts += [f"--- rank {self.rank}: output (tail) ---", self.output.rstrip()]
        return "\n".join(parts)


class WorkerFailed(Exception):
    """Raised when a worker raised, died, or the run timed out.

    Attributes: ``errors`` (rank -> :class:`WorkerError`), ``results`` (list by
    rank; ``None`` where no result came back), ``timed_out`` (bool).
    """

    def __init__(self, message: str, errors: dict[int, WorkerError] | None = None,
                 results: list[Any] | None = None, timed_out: bool = False):
        self.errors = dict(errors or {})
        self.results = results
        self.timed_out = timed_out
        details = "\n".join(e.format() for _, e in sorted(self.errors.items()))
        super().__init__(message + ("\n" + details if details else ""))


# --------------------------------------------------------------------------
# Forkserver context
# --------------------------------------------------------------------------

_ctx_lock = threading.Lock()
_ctx: multiprocessing.context.BaseContext | None = None


def _preload_modules() -> list[str]:
    mods = list(_PRELOAD_ALWAYS)
    for name in _PRELOAD_OPTIONAL:
        # Only look up the top-level package: find_spec("a.b") imports "a"
        # in this process. The forkserver ignores ImportError anyway.
        try:
            if importlib.util.find_spec(name.partition(".")[0]) is not None:
                mods.append(name)
        except (ImportError, ValueError):
            pass
    for name in _PRELOAD_GUARDED:
        try:
            if importlib.util.find_spec(name) is None:
                continue
            importlib.import_module(name)
        except Exception:  # not there yet, or broken mid-edit: don't preload
            continue
        mods.append(name)
    return mods


def _extra_sys_path() -> list[str]:
    """Entries of sys.path a fresh interpreter would not have (tests/, src/...).

    Python 3.11's forkserver ignores the ``sys_path`` it is given, so modules
    found only through pytest/conftest additions to sys.path would not be
    preloaded; pass them through PYTHONPATH instead.
    """
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    extra = []
    for p in sys.path:
        if not p or not os.path.isdir(p):
            continue
        rp = os.path.realpath(p)
        if any(rp == pre or rp.startswith(pre + os.sep) for pre in prefixes):
            continue
        if p not in extra:
            extra.append(p)
    return extra


def get_context() -> multiprocessing.context.BaseContext:
    """The session's forkserver context (created, and its server started, on first use)."""
    global _ctx
    with _ctx_lock:
        if _ctx is not None:
            return _ctx
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(_preload_modules())
        old_pp = os.environ.get("PYTHONPATH")
        extra = _extra_sys_path()
        if extra:
            os.environ["PYTHONPATH"] = os.pathsep.join(extra + ([old_pp] if old_pp else []))
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            if extra:
                if old_pp is None:
                    os.environ.pop("PYTHONPATH", None)
                else:
                    os.environ["PYTHONPATH"] = old_pp
        _ctx = ctx
        return ctx


def infrastructure_pids() -> set[int]:
    """Pids of long-lived helper processes (forkserver, resource tracker).

    These are children of the test process that legitimately outlive a test;
    the leak check in conftest excludes them (but not their children).
    """
    pids = set()
    fs = getattr(multiprocessing.forkserver, "_forkserver", None)
    if fs is not None and getattr(fs, "_forkserver_pid", None):
        pids.add(fs._forkserver_pid)
    try:
        from multiprocessing import resource_tracker

        rt = resource_tracker._resource_tracker
        if getattr(rt, "_pid", None):
            pids.add(rt._pid)
    except Exception:
        pass
    return pids


# --------------------------------------------------------------------------
# Ports
# --------------------------------------------------------------------------

_used_ports: set[int] = set()
_ports_lock = threading.Lock()


def free_port() -> int:
    """A port on 127.0.0.1 that is free now and new to this session.

    Bind port 0 and close. Never hands out the same port twice in a session,
    so a test never lands on a port a previous test's store may still hold.
    """
    with _ports_lock:
        for _ in range(1000):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((MASTER_ADDR, 0))
                port = s.getsockname()[1]
            if port not in _used_ports:
                _used_ports.add(port)
                return port
    raise RuntimeError("could not find a fresh free port")


# --------------------------------------------------------------------------
# Child side
# --------------------------------------------------------------------------

_child_dump_file = None  # keeps the faulthandler SIGUSR1 target open


def _set_pdeathsig() -> None:
    """SIGKILL this worker if its parent (the forkserver) dies.

    The forkserver exits once every holder of its "alive" pipe's write end
    has closed it. Forked workers inherit a copy, which would keep the
    forkserver (and so the workers) alive after the test process is
    SIGKILLed; drop the copy so that only the test process holds it. (A
    worker that itself uses the forkserver context then starts its own.)
    """
    fs = getattr(multiprocessing.forkserver, "_forkserver", None)
    fd = getattr(fs, "_forkserver_alive_fd", None)
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
        fs._forkserver_alive_fd = None
        fs._forkserver_address = None
        fs._forkserver_pid = None
    parent = os.getppid()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception:
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


class _ErrorRecorder(logging.Handler):
    """Records the ERROR+ records that reach its logger, without changing what is printed.

    A logger with a handler somewhere up its chain no longer falls back to
    :data:`logging.lastResort` (WARNING+ to stderr); so when this handler is the
    only one a record meets, it hands the record on to ``lastResort`` itself.
    """

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s [%(threadName)s]: %(message)s"))
        self.count = 0
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            self.count += 1
            if len(self.records) < _LOGGED_ERRORS_MAX:
                text = self.format(record)
                if len(text) > _LOGGED_ERROR_CHARS:
                    text = text[:_LOGGED_ERROR_CHARS] + "\n[...]"
                self.records.append(text)
        last = logging.lastResort
        if last is not None and record.levelno >= last.level and self._only_handler(record):
            last.handle(record)

    def _only_handler(self, record: logging.LogRecord) -> bool:
        """Whether no other handler sees ``record`` (the condition for ``lastResort``)."""
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None:
            if any(h is not self for h in logger.handlers):
                return False
            logger = logger.parent if logger.propagate else None
        return True

    def snapshot(self) -> tuple[int, list[str]]:
        """(number of ERROR+ records so far, the first few of them formatted)."""
        with self.lock:
            return self.count, list(self.records)


def _child_main(rank: int, world_size: int, fn: Callable, args: tuple,
                environ: dict[str, str], conn, log_path: str, dump_path: str) -> None:
    global _child_dump_file
    _set_pdeathsig()
    # stdout/stderr -> per-rank log (fd level, so C++ output is caught too).
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(line_buffering=True)
        except Exception:
            pass
    faulthandler.enable(file=sys.stderr, all_threads=True)
    _child_dump_file = open(dump_path, "w")
    faulthandler.register(signal.SIGUSR1, file=_child_dump_file, all_threads=True)

    os.environ.clear()
    os.environ.update(environ)

    recorder = _ErrorRecorder()
    logging.getLogger(_LOGGED_ERRORS_LOGGER).addHandler(recorder)
    try:
        value = fn(rank, world_size, *args)
        try:
            payload = pickle.dumps(("ok", value, recorder.snapshot()),
                                   protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:
            payload = pickle.dumps(("err", "UnpicklableResult",
                                    f"return value of rank {rank} could not be pickled: "
                                    f"{type(e).__name__}: {e}", recorder.snapshot()))
    except BaseException as e:  # noqa: BLE001 - report everything, incl. SystemExit
        tb = "".join(traceback.format_exception(e))
        payload = pickle.dumps(("err", type(e).__name__, tb, recorder.snapshot()))
    conn.send_bytes(payload)
    conn.close()


# --------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------

_live_groups: "weakref.WeakSet[WorkerGroup]" = weakref.WeakSet()


@atexit.register
def _kill_all_at_exit() -> None:
    for g in list(_live_groups):
        try:
            g.kill_all()
        except Exception:
            pass


def _read_text(path: str, tail: int | None = None) -> str:
    try:
        with open(path, "rb") as f:
            if tail is not None:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - tail))
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", "replace")
    if tail is not None and len(data) >= tail:
        text = "[...]" + text
    return text


def _fn_name(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


class WorkerGroup:
    """Handle on running workers (see :func:`start_workers`)."""

    def __init__(self, fn: Callable, world_size: int, *, args: Sequence = (),
                 env: dict[str, str] | None = None, port: int | None = None,
                 allow_errors: bool = False):
        if world_size < 1:
            raise ValueError("world_size must be >= 1")
        self.fn = fn
        self.world_size = world_size
        self.allow_errors = allow_errors
        self.port = free_port() if port is None else port
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self._conns: list[Any] = []
        self._killed: set[int] = set()
        self._results: dict[int, Any] = {}  # rank -> value (or WorkerError)
        self._logged: dict[int, tuple[int, list[str]]] = {}  # rank -> (count, records) logged
        self._got: set[int] = set()  # ranks whose pipe gave a result or EOF
        self._tmpdir = tempfile.mkdtemp(prefix="torchrpc-workers-")
        self._joined = False
        self._output_emitted = False
        ctx = get_context()
        base_env = dict(os.environ)
        try:
            for rank in range(world_size):
                environ = dict(base_env)
                environ.update(MASTER_ADDR=MASTER_ADDR, MASTER_PORT=str(self.port),
                               RANK=str(rank), WORLD_SIZE=str(world_size),
                               LOCAL_RANK=str(rank))
                if env:
                    environ.update({k: str(v) for k, v in env.items()})
                r, w = ctx.Pipe(duplex=False)
                p = ctx.Process(
                    target=_child_main,
                    args=(rank, world_size, fn, tuple(args), environ, w,
                          self._log_path(rank), self._dump_path(rank)),
                    name=f"worker-{rank}",
                    daemon=False,
                )
                self.procs.append(p)
                self._conns.append(r)
                p.start()
                w.close()
        except BaseException:
            self.kill_all()
            self._cleanup()
            raise
        _live_groups.add(self)

    # -- paths ------------------------------------------------------------
    def _log_path(self, rank: int) -> str:
        return os.path.join(self._tmpdir, f"rank{rank}.log")

    def _dump_path(self, rank: int) -> str:
        return os.path.join(self._tmpdir, f"rank{rank}.stack")

    # -- control ----------------------------------------------------------
    def alive(self, rank: int) -> bool:
        return self.procs[rank].is_alive()

    def kill(self, rank: int, timeout: float = 10.0) -> None:
        """SIGKILL ``rank`` and wait for it to be gone; its result is :data:`KILLED`."""
        self._killed.add(rank)
        p = self.procs[rank]
        if p.pid is not None and p.exitcode is None:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.join(timeout)

    def kill_all(self) -> None:
        """SIGKILL every worker still running and reap them."""
        for p in self.procs:
            if p.pid is not None and p.exitcode is None:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            if p.pid is not None:
                p.join(10)

    def __enter__(self) -> "WorkerGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.kill_all()
        self._cleanup()

    # -- results ----------------------------------------------------------
    def _receive(self, rank: int) -> None:
        conn = self._conns[rank]
        try:
            payload = conn.recv_bytes()
        except (EOFError, OSError):
            self._got.add(rank)
            return
        self._got.add(rank)
        try:
            msg = pickle.loads(payload)
        except Exception as e:
            self._results[rank] = WorkerError(rank, "UnpicklableResult",
                                              f"could not unpickle result in parent: "
                                              f"{type(e).__name__}: {e}")
            return
        if msg[0] == "ok":
            self._results[rank] = msg[1]
        else:
            self._results[rank] = WorkerError(rank, msg[1], msg[2])
        if msg[-1][0]:
            self._logged[rank] = msg[-1]

    def _format_logged(self, rank: int) -> str:
        """What ``rank`` logged at ERROR+ on the torchrpc logger, quoted."""
        count, records = self._logged[rank]
        lines = [f"rank {rank} logged {count} record(s) at ERROR or above on the "
                 f"{_LOGGED_ERRORS_LOGGER!r} logger while running {_fn_name(self.fn)} "
                 f"(pass allow_errors=True to run_workers/start_workers if the test "
                 f"provokes them on purpose):"]
        for text in records:
            lines += ["    " + line for line in text.splitlines()]
        if count > len(records):
            lines.append(f"    [... {count - len(records)} more]")
        return "\n".join(lines)

    def _is_error(self, rank: int) -> bool:
        if rank in self._killed:
            return False
        if rank in self._results:
            return isinstance(self._results[rank], WorkerError)
        # Finished without reporting anything: died.
        return rank in self._got and self.procs[rank].exitcode is not None

    def _pending(self) -> list[int]:
        return [r for r in range(self.world_size)
                if r not in self._killed
                and (r not in self._got or self.procs[r].exitcode is None)]

    def _dump_stacks(self, ranks: Iterable[int]) -> dict[int, str]:
        """SIGUSR1 ``ranks`` (faulthandler dumps all threads) and collect the dumps."""
        ranks = [r for r in ranks if self.procs[r].exitcode is None]
        for r in ranks:
            try:
                os.kill(self.procs[r].pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
        dumps: dict[int, str] = {}
        deadline = time.monotonic() + _DUMP_WAIT_S
        last_sizes: dict[int, int] = {}
        while time.monotonic() < deadline:
            done = True
            for r in ranks:
                try:
                    size = os.path.getsize(self._dump_path(r))
                except OSError:
                    size = 0
                if size == 0 or last_sizes.get(r) != size:
                    done = False
                last_sizes[r] = size
            if done:
                break
            time.sleep(0.05)
        for r in ranks:
            dumps[r] = _read_text(self._dump_path(r)) or "(no stack dump: the process did not answer SIGUSR1)"
        return dumps

    def _abort(self, ranks: list[int], type_name: str, why: str) -> dict[int, WorkerError]:
        """Stack-dump then SIGKILL ``ranks``; return a WorkerError for each."""
        dumps = self._dump_stacks(ranks)
        self.kill_all()
        errors = {}
        for r in ranks:
            if r in self._results and not isinstance(self._results[r], WorkerError):
                msg = (f"rank {r} returned a result but its process did not exit "
                       f"({why}); a leaked non-daemon thread or a hang at exit?")
            else:
                msg = f"rank {r} had not finished ({why})"
            errors[r] = WorkerError(r, type_name, msg, self.procs[r].exitcode,
                                    stack_dump=dumps.get(r, ""))
        return errors

    def join(self, timeout: float = 60.0, *, check: bool = True,
             fail_fast_grace: float = _FAIL_FAST_GRACE_S) -> list[Any]:
        """Wait for all workers; return results by rank.

        A rank killed through :meth:`kill` gives :data:`KILLED`. With
        ``check=True`` (default) any failed rank raises :class:`WorkerFailed`,
        and once a rank has failed the others get ``fail_fast_grace`` seconds
        before they are stack-dumped and killed. A rank that returned but
        logged errors (see "Logged errors" above) fails as ``LoggedError``
        once all ranks are done; it does not cut the others short. With
        ``check=False`` failed ranks give :class:`WorkerError` objects in the
        list instead. Running out of ``timeout`` always raises
        :class:`WorkerFailed` after dumping the stacks of, and killing, the
        unfinished workers.
        """
        start = time.monotonic()
        deadline = start + timeout
        aborted: dict[int, WorkerError] = {}
        timed_out = False
        failed_first: int | None = None
        try:
            while True:
                pending = self._pending()
                if not pending:
                    break
                now = time.monotonic()
                if check and failed_first is None:
                    failed = [r for r in range(self.world_size) if self._is_error(r)]
                    if failed:
                        failed_first = failed[0]
                        deadline = min(deadline, now + fail_fast_grace)
                if now >= deadline:
                    if failed_first is not None and deadline < start + timeout:
                        why = (f"killed {fail_fast_grace:g}s after rank {failed_first} failed")
                        aborted = self._abort(pending, "Aborted", why)
                    else:
                        timed_out = True
                        aborted = self._abort(pending, "TimedOut",
                                              f"timed out after {timeout:g}s")
                    break
                waitables = []
                owner = {}
                for r in pending:
                    if r not in self._got:
                        waitables.append(self._conns[r])
                        owner[id(self._conns[r])] = r
                    if self.procs[r].exitcode is None:
                        waitables.append(self.procs[r].sentinel)
                ready = multiprocessing.connection.wait(waitables, timeout=deadline - now)
                for obj in ready:
                    r = owner.get(id(obj))
                    if r is not None:
                        self._receive(r)
                # Reap exited processes so .exitcode is set.
                for r in pending:
                    self.procs[r].join(0)
        finally:
            # Never leave a process behind, whatever happened (incl. pytest-timeout).
            if self._pending():
                self.kill_all()
            self._emit_output()

        results: list[Any] = []
        errors: dict[int, WorkerError] = {}
        for r in range(self.world_size):
            if r in self._killed:
                results.append(KILLED)
                continue
            if r in aborted:
                err = aborted[r]
            elif r in self._results:
                err = self._results[r]
                if (r in self._logged and not self.allow_errors
                        and not isinstance(err, WorkerError)):
                    err = WorkerError(r, "LoggedError", self._format_logged(r))
            else:
                code = self.procs[r].exitcode
                err = WorkerError(r, "Died", f"rank {r} exited with code {code} "
                                  f"without reporting a result", code)
            if isinstance(err, WorkerError):
                if r in self._logged and not self.allow_errors and err.type_name != "LoggedError":
                    err.traceback = err.traceback.rstrip() + "\n" + self._format_logged(r)
                if err.exitcode is None:
                    err.exitcode = self.procs[r].exitcode
                err.output = _read_text(self._log_path(r), _OUTPUT_TAIL_CHARS)
                errors[r] = err
            results.append(err)
        self._joined = True
        self._cleanup()

        if timed_out:
            raise WorkerFailed(
                f"timed out after {timeout:g}s running {_fn_name(self.fn)} "
                f"(world_size={self.world_size}, port={self.port}); ranks "
                f"{sorted(aborted)} had not finished and were killed",
                errors, results, timed_out=True)
        if check and errors:
            raise WorkerFailed(
                f"{len(errors)} of {self.world_size} workers failed running "
                f"{_fn_name(self.fn)} (world_size={self.world_size}, port={self.port}); "
                f"failed ranks: {sorted(errors)}",
                errors, results)
        return results

    def _emit_output(self) -> None:
        if self._output_emitted:
            return
        self._output_emitted = True
        for r in range(self.world_size):
            text = _read_text(self._log_path(r))
            if text:
                sys.stderr.write(f"----- worker rank {r} output -----\n{text}")
                if not text.endswith("\n"):
                    sys.stderr.write("\n")

    def _cleanup(self) -> None:
        for c in self._conns:
            try:
                c.close()
            except Exception:
                pass
        shutil.rmtree(self._tmpdir, ignore_errors=True)
        _live_groups.discard(self)


def start_workers(fn: Callable, world_size: int, *, args: Sequence = (),
                  env: dict[str, str] | None = None, port: int | None = None,
                  allow_errors: bool = False) -> WorkerGroup:
    """Start ``fn(rank, world_size, *args)`` in ``world_size`` fresh workers; return a handle.

    Use ``with start_workers(...) as g: ...; results = g.join(timeout)``.
    ``allow_errors=True``: a rank that logged errors on the torchrpc logger does not fail.
    """
    return WorkerGroup(fn, world_size, args=args, env=env, port=port, allow_errors=allow_errors)


def run_workers(fn: Callable, world_size: int, *, args: Sequence = (), timeout: float = 60,
                env: dict[str, str] | None = None, port: int | None = None,
                allow_errors: bool = False) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` workers; results by rank.

    Raises :class:`WorkerFailed` (with every failing rank's traceback, stack
    dumps of hung ranks and output tails) if a rank fails, logs a record at
    ERROR or above on the torchrpc logger (unless ``allow_errors``), or the
    whole run takes longer than ``timeout`` seconds. No worker outlives the call.
    """
    with start_workers(fn, world_size, args=args, env=env, port=port,
                       allow_errors=allow_errors) as group:
        return group.join(timeout)
