# Capsa Python kernel driver, embedded in the guest agent and run as `python3 -c`.
#
# Protocol (the agent's side is in kernel/python.rs):
#   fd 0  /dev/null
#   fd 1  user stdout, raw bytes, write-through (the agent reads it in chunks)
#   fd 2  user stderr, likewise
#   fd 3  requests, agent -> driver, one JSON object per line:
#           {"op": "exec", "code": str, "env": {str: str}, "cwd": str}
#           {"op": "env", "env": {str: str}}          (session env; no reply)
#   fd 4  events, driver -> agent, one JSON object per line:
#           {"ev": "result", "data": {mime: hex}}
#           {"ev": "display", "data": {mime: hex}}
#           {"ev": "error", "name": str, "value": str, "traceback": [str]}
#           {"ev": "done", "ok": bool, "exit_code": int, "cpu_ns": int, "interp_ns": int}
# Everything user code prints is written to fd 1/2 before the event that follows it is
# written to fd 4, so the agent keeps the order by draining the pipes before each event.
import ast
import builtins
import io
import json
import linecache
import os
import resource
import signal
import sys
import time
import traceback
import types

# Processes the user starts must not hold the control pipes.
os.set_inheritable(3, False)
os.set_inheritable(4, False)

sys.argv = [""]  # as in the interactive interpreter
sys.stdout.reconfigure(write_through=True)
sys.stderr.reconfigure(write_through=True)

# User code runs in a module of its own, registered as __main__ so pickling and
# multiprocessing find what it defines.
_main = types.ModuleType("__main__")
_main.__dict__["__builtins__"] = builtins
sys.modules["__main__"] = _main
_ns = _main.__dict__

_running = False


def _on_sigint(signum, frame):
    # The agent interrupts only running code; a SIGINT that lands between executes
    # (a timeout racing a completion) must not break the driver loop.
    if _running:
        raise KeyboardInterrupt


signal.signal(signal.SIGINT, _on_sigint)


def _send(obj):
    # A pipe write may be partial (a signal mid-write): loop until the line is out.
    data = memoryview(json.dumps(obj).encode() + b"\n")
    while data:
        data = data[os.write(4, data):]


def _cpu_ns():
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return int((s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime) * 1e9)


class _Reader:
    """Line reader over fd 3 that survives a stray KeyboardInterrupt."""

    def __init__(self):
        self._buf = bytearray()

    def line(self):
        while True:
            i = self._buf.find(b"\n")
            if i >= 0:
                out = bytes(self._buf[:i])
                del self._buf[: i + 1]
                return out
            try:
                chunk = os.read(3, 1 << 16)
            except KeyboardInterrupt:
                continue
            if not chunk:
                return None
            self._buf += chunk


def _format_error(exc, skip_frames):
    tb = exc.__traceback__
    for _ in range(skip_frames):
        if tb is not None:
            tb = tb.tb_next
    lines = traceback.format_exception(type(exc), exc, tb)
    return {
        "ev": "error",
        "name": type(exc).__name__,
        "value": str(exc),
        "traceback": [l.rstrip("\n") for l in lines],
    }


def _flush_figures():
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return
    try:
        for num in pyplot.get_fignums():
            fig = pyplot.figure(num)
            buf = io.BytesIO()
            fig.savefig(buf, format="png")
            _send({"ev": "display", "data": {"image/png": buf.getvalue().hex()}})
        pyplot.close("all")
    except Exception as exc:  # a broken figure must not take the kernel down
        _send(_format_error(exc, 0))


_cell = 0


def _run(code):
    """Runs one cell; returns (ok, exit_code, interp_ns)."""
    global _cell, _running
    _cell += 1
    filename = f"<cell-{_cell}>"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    try:
        tree = ast.parse(code, filename, "exec")
    except SyntaxError as exc:
        _send(_format_error(exc, 1))
        return False, 1, 0
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    started = time.perf_counter_ns()
    try:
        try:
            _running = True
            exec(compile(tree, filename, "exec"), _ns)
            value = eval(compile(last, filename, "eval"), _ns) if last is not None else None
        finally:
            _running = False
        interp = time.perf_counter_ns() - started
        if value is not None:
            _ns["_"] = value
            _send({"ev": "result", "data": {"text/plain": repr(value).encode(errors="surrogateescape").hex()}})
        return True, 0, interp
    except SystemExit as exc:
        interp = time.perf_counter_ns() - started
        code_ = exc.code
        if code_ is None or code_ == 0:
            return True, 0, interp
        _send(_format_error(exc, 1))
        return False, code_ if isinstance(code_, int) else 1, interp
    except BaseException as exc:
        interp = time.perf_counter_ns() - started
        _send(_format_error(exc, 1))
        return False, 1, interp


def _with_call_env(env, cwd, fn):
    saved_env = {k: os.environ.get(k) for k in env}
    saved_cwd = os.getcwd() if cwd else None
    try:
        os.environ.update(env)
        if cwd:
            os.chdir(cwd)
        return fn()
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if saved_cwd is not None:
            try:
                os.chdir(saved_cwd)
            except OSError:
                pass


def _main_loop():
    reader = _Reader()
    while True:
        line = reader.line()
        if line is None:
            return  # the agent is gone
        req = json.loads(line)
        if req["op"] == "env":
            os.environ.update(req["env"])
            continue
        cpu0 = _cpu_ns()
        try:
            ok, exit_code, interp = _with_call_env(
                req.get("env") or {}, req.get("cwd") or "", lambda: _run(req["code"])
            )
        except OSError as exc:  # e.g. the per-call cwd vanished
            _send(_format_error(exc, 0))
            ok, exit_code, interp = False, 1, 0
        _flush_figures()
        _send({"ev": "done", "ok": ok, "exit_code": exit_code,
               "cpu_ns": max(0, _cpu_ns() - cpu0), "interp_ns": interp})


_main_loop()
