"""runtime.submit as a process among others: its workers die with it, and its stderr may be closed or broken."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from .conftest import KERNEL_PYTHON, SAMPLE_TEST, SANDBOX, run_kernel

PYTHON = KERNEL_PYTHON if KERNEL_PYTHON.exists() else Path(sys.executable)
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the death signal is Linux's")


def children(pid: int) -> dict[int, str]:
    """pid -> command line of each living child of `pid`."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)", which may hold spaces
            if int(fields[1]) == pid and fields[0] != "Z":
                found[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
    return found


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie that nobody reaped yet (dead all the same)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Drain:
    """Reads a pipe to its end in a thread: `text` so far, and `ended` once every writer has closed it."""

    def __init__(self, pipe) -> None:
        self.chunks: list[bytes] = []
        self.ended = threading.Event()
        threading.Thread(target=self._read, args=(pipe,), daemon=True).start()

    def _read(self, pipe) -> None:
        while chunk := os.read(pipe.fileno(), 65536):
            self.chunks.append(chunk)
        self.ended.set()

    @property
    def text(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")


def long_test(path: Path, rows: int) -> Path:
    """The sample test rows, each explanation made unique (token ids are deduplicated), `rows` of them."""
    df = pd.read_csv(SAMPLE_TEST, dtype=str, keep_default_na=False)
    df = pd.concat([df] * (rows // len(df) + 1), ignore_index=True).head(rows)
    df["row_id"] = range(rows)
    df["StudentExplanation"] = [" ".join(str(i)) + " " + t for i, t in enumerate(df["StudentExplanation"])]  # digits are in the vocabulary
    df.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=lambda s: s.name)
def test_workers_and_the_resource_tracker_die_with_their_parent(tiny_pipeline, tmp_path, sig):
    """Before, a two-worker run killed mid-prediction left both workers (each waiting on a queue it holds both
    ends of) and the resource tracker alive, holding the caller's stdout and stderr: a caller reading them hung."""
    bundle = tiny_pipeline["bundle"]
    test = long_test(tmp_path / "test.csv", 20000)
    args = ["--bundle", ".", "--test", str(test), "--out", str(tmp_path / "s.csv"), "--devices", "2", "--batch-size", "1"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": f"{SANDBOX}{os.pathsep}{bundle}"}
    proc = subprocess.Popen([str(PYTHON), "-P", "-m", "runtime.submit", *args], cwd=bundle, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = Drain(proc.stdout), Drain(proc.stderr)
    spawned: dict[int, str] = {}
    try:
        up = time.monotonic() + 300
        while len(re.findall(r"\.onnx on \w+ExecutionProvider", err.text)) < 2:  # both workers are past their initializer
            assert time.monotonic() < up and proc.poll() is None, err.text[-2000:]
            time.sleep(0.1)
        spawned = children(proc.pid)
        assert sum("spawn_main" in c for c in spawned.values()) == 2 and any("resource_tracker" in c for c in spawned.values()), spawned
        proc.send_signal(sig)
        assert out.ended.wait(10) and err.ended.wait(10), f"pipes still open, held by {[p for p in spawned if alive(p)]}"
        assert proc.wait(10) == -sig
        gone = time.monotonic() + 5
        while any(map(alive, spawned)) and time.monotonic() < gone:
            time.sleep(0.1)
        assert not [p for p in spawned if alive(p)], spawned
    finally:  # a failure here must not leave this run's processes behind
        for pid in filter(alive, [proc.pid, *spawned]):
            with contextlib.suppress(ProcessLookupError):  # ended meanwhile
                os.kill(pid, signal.SIGKILL)
        proc.wait()


def test_a_worker_whose_parent_died_before_it_asked_for_the_signal_exits():
    """The death signal covers only a parent alive when it is asked for: a worker whose parent is no longer the pid
    it was given (here its own pid, which is nobody's parent's) exits rather than run on unwatched."""
    code = "import os; from runtime.engine import die_with; die_with(os.getpid()); print('alive')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 1 and done.stdout == "", done.stderr


# Python's own execv: a shell could close stderr, but not make it a pipe that nobody reads.
WRAPPER = """#!{wrapper}
import os, sys
if {stderr!r} == "closed":
    os.close(2)
else:  # every write is EPIPE
    r, w = os.pipe()
    os.close(r)
    os.dup2(w, 2)
os.execv({python!r}, [{python!r}, *sys.argv[1:]])
"""


@pytest.mark.parametrize("stderr", ["closed", "broken"])
def test_a_closed_or_broken_stderr_costs_no_member(tiny_pipeline, tmp_path, stderr):
    """Before, the progress bar's first write raised (AttributeError on the None that Python makes of a closed
    stderr, BrokenPipeError on a pipe nobody reads), and the member was skipped for the label prior."""
    wrapper = tmp_path / "python"
    wrapper.write_text(WRAPPER.format(wrapper=sys.executable, stderr=stderr, python=str(PYTHON)))
    wrapper.chmod(0o755)
    runs = {}
    for name, python in (("open", PYTHON), (stderr, wrapper)):  # two workers: they inherit that stderr too
        out = tmp_path / f"{name}.csv"
        runs[name] = run_kernel(tiny_pipeline["bundle"], "--bundle", ".", "--test", str(SAMPLE_TEST), "--out", str(out), "--devices", "2", python=python)
        assert runs[name].returncode == 0, runs[name].stderr[-2000:]
    assert runs[stderr].stderr == ""
    for r in runs.values():
        assert r.result["members_run"] == ["m0-bert-fp32"] and r.result["faults"] == [], r.result
    assert (tmp_path / f"{stderr}.csv").read_text() == (tmp_path / "open.csv").read_text()


def descendants(pid: int) -> dict[int, str]:
    found = children(pid)
    for child in list(found):
        found |= descendants(child)
    return found


@pytest.mark.slow
def test_ctrl_c_in_verify_exits_130_and_leaves_no_kernel_running(kaggle_bundle, tmp_path):
    """Ctrl-C while the twin's notebook runs the runtime: the terminal sends SIGINT to mapbuild's process group (the
    Jupyter kernel has a session of its own). It read as a broken bundle: "the notebook stopped ... KeyboardInterrupt",
    exit 1."""
    rows = long_test(tmp_path / "rows.csv", 20_000)  # long enough to be interrupted mid-run
    verify = subprocess.Popen([sys.executable, "-m", "builder", "verify", str(kaggle_bundle), "--test", str(rows)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 600
    while not any("runtime.submit" in c for c in descendants(verify.pid).values()):
        assert verify.poll() is None and time.monotonic() < deadline, verify.communicate()
        time.sleep(0.2)
    running = descendants(verify.pid)
    os.killpg(verify.pid, signal.SIGINT)
    out, err = verify.communicate(timeout=120)
    assert verify.returncode == 130, err.decode()
    assert "Interrupted" in err.decode() and "notebook stopped" not in err.decode() and "Traceback" not in err.decode()
    time.sleep(1)
    assert not [c for pid, c in running.items() if alive(pid)]  # the kernel and the runtime went with it
