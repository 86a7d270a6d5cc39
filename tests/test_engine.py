
import io
import sys
import weakref
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import pandas as pd
import pytest

from runtime.data import read_rows
from runtime.engine import CPU, DevicePool, batches, pad, run_batches, softmax
from runtime.labels import LabelSpace
from runtime.manifest import load_manifest

from .conftest import SAMPLE_TRAIN


def test_sorted_batches_cover_each_row_once_and_group_lengths():
    lengths = [5, 1, 9, 3, 3, 7, 2]
    got = batches(lengths, 3)
    assert sorted(np.concatenate(got).tolist()) == list(range(len(lengths)))
    assert [[lengths[i] for i in b] for b in got] == [[1, 2, 3], [3, 5, 7], [9]]
    assert [b.tolist() for b in batches(lengths, 3, sort=False)] == [[0, 1, 2], [3, 4, 5], [6]]


def test_pad_right_pads_to_the_longest():
    ids, mask = pad([[7, 8, 9], [4]], pad_id=0)
    assert ids.tolist() == [[7, 8, 9], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == np.int64


def test_run_batches_returns_rows_in_input_order():
    seqs = [[1] * n for n in (4, 1, 6, 2, 5)]
    forward = lambda ids, mask: np.stack([mask.sum(1), ids.shape[1] * np.ones(len(ids))], 1).astype(np.float32)
    got = run_batches(forward, seqs, 0, batch_size=2)
    assert got[:, 0].tolist() == [4, 1, 6, 2, 5]
    # Sorted batches pad less than input order: total padded width is smaller.
    assert got[:, 1].sum() < run_batches(forward, seqs, 0, batch_size=2, sort=False)[:, 1].sum()


def test_run_batches_runs_duplicates_once_and_restores_every_row():
    seqs = [[3, 4], [5], [3, 4], [5], [6, 7, 8]]
    seen: list[list[int]] = []

    def forward(ids, mask):
        seen.extend(row[m.astype(bool)].tolist() for row, m in zip(ids, mask))
        return ids[:, :1].astype(np.float32)

    got = run_batches(forward, seqs, 0, batch_size=2)
    assert sorted(seen) == [[3, 4], [5], [6, 7, 8]]
    assert got[:, 0].tolist() == [3, 5, 3, 5, 6]
    seen.clear()
    run_batches(forward, seqs, 0, batch_size=2, dedupe=False)
    assert len(seen) == len(seqs)


def test_session_threads_run_rows_at_once_each_with_its_own_output():
    """An int8 member's one-row runs go to one session from several threads at once (issue 43): each row still gets
    its own output, in input order, and every thread runs some."""
    import threading
    import time

    from runtime.engine import SessionThreads

    names, lock = set(), threading.Lock()

    def forward(ids, mask):
        with lock:
            names.add(threading.current_thread().name)
        time.sleep(0.002)  # a run long enough that the queue fills the threads
        return mask.sum(1, keepdims=True).astype(np.float32) + 100 * ids[:, :1]

    forward.provider = CPU
    seqs = [[i % 7] * (1 + i % 13) for i in range(60)]
    with SessionThreads(forward, 3) as pool:
        got = run_batches(pool, seqs, 0, batch_size=1)
    assert got[:, 0].tolist() == [len(s) + 100 * s[0] for s in seqs]
    assert len(names) == 3 and pool.provider == CPU and pool.workers == 3


class FakeOOM(RuntimeError):
    """What onnxruntime's CUDA arena raises when a batch does not fit (its message, shortened)."""


def fitting(limit: int, seen: list[tuple[int, int]]):
    """A forward that runs out of memory past `limit` padded tokens per batch, recording each shape it ran."""

    def forward(ids, mask):
        if ids.size > limit:
            raise FakeOOM("RUNTIME_EXCEPTION : BFCArena::AllocateRawInternal Failed to allocate memory for requested buffer of size 8388608")
        seen.append(ids.shape)
        return np.stack([mask.sum(1), ids.shape[1] * np.ones(len(ids))], 1).astype(np.float32)

    return forward


def test_a_batch_out_of_memory_is_retried_in_halves_down_to_one_row(caplog):
    """Sorted batches put the longest rows last: running out of memory there must cost that batch's speed, not the
    member after hours of work."""
    import logging

    import pytest

    seqs = [[1] * n for n in (3, 9, 2, 30, 4, 28, 1, 5)]
    seen: list[tuple[int, int]] = []
    with caplog.at_level(logging.WARNING, logger="mapbuild"):
        got = run_batches(fitting(50, seen), seqs, 0, batch_size=4)
    assert got[:, 0].tolist() == [3, 9, 2, 30, 4, 28, 1, 5]
    # the long batch (5, 9, 28, 30 tokens: 4 x 30) runs as 2 x 9, then 1 x 28 and 1 x 30: each half its own width
    assert seen == [(4, 4), (2, 9), (1, 28), (1, 30)]
    assert caplog.text.count("out of memory on a batch") == 2

    with pytest.raises(FakeOOM):  # a single row that does not fit gives the member up
        run_batches(fitting(20, []), seqs, 0, batch_size=4)
    with pytest.raises(ZeroDivisionError):  # and any other error is no reason to retry
        run_batches(lambda ids, mask: 1 / 0, seqs, 0, batch_size=4)


class ThreadDevicePool(DevicePool):
    """A DevicePool whose workers are threads running `forward`: run_feeds' pool path without processes."""

    def __init__(self, forward, workers: int) -> None:  # noqa: super().__init__ would spawn processes
        self.forward, self.workers, self.providers = forward, workers, set()
        self.threads = ThreadPoolExecutor(workers)

    def submit(self, fn, feed):
        return self.threads.submit(lambda: (self.forward(*feed), CPU))


def live_counter(build):
    """`build` wrapped to count the feeds it made that are still alive, and the most alive at once."""
    seen = {"live": 0, "most": 0, "built": 0}

    def gone():
        seen["live"] -= 1

    def counted(*args):
        feed = build(*args)
        seen["live"] += 1
        seen["built"] += 1
        seen["most"] = max(seen["most"], seen["live"])
        weakref.finalize(feed[0], gone)
        return feed

    return counted, seen


def test_a_device_pool_queues_a_few_batches_per_worker_not_the_whole_run(monkeypatch):
    """Every batch was queued at once, so every batch's inputs were held from the start: a packed run's masks
    are GiBs (issue 40). A pool now holds at most two batches a worker ahead, and still returns every row in order."""
    import runtime.engine as engine

    counted, seen = live_counter(engine.pad)
    monkeypatch.setattr(engine, "pad", counted)
    seqs = [[1] * (1 + i % 13) for i in range(200)]
    forward = lambda ids, mask: mask.sum(1, keepdims=True).astype(np.float32)  # noqa: E731
    pool = ThreadDevicePool(forward, 2)
    try:
        got = run_batches(pool, seqs, 0, batch_size=2, dedupe=False)
    finally:
        pool.threads.shutdown()
    assert got[:, 0].tolist() == [len(s) for s in seqs] and seen["built"] == 100
    assert seen["most"] <= 2 * 2 + 1, seen


def test_softmax_rows_sum_to_one():
    p = softmax(np.array([[1000.0, 0.0], [1.0, 1.0]], dtype=np.float32))
    assert np.allclose(p.sum(1), 1) and np.allclose(p[1], 0.5)


def test_two_worker_processes_give_exactly_the_single_device_result(tiny_pipeline):
    """The 2x T4 path with CPU workers: whole batches go to workers, so every row's probabilities are unchanged."""
    from runtime.predict import predict

    manifest = load_manifest(tiny_pipeline["bundle"])
    space = LabelSpace.from_json(manifest["label_space"])
    df = pd.concat([read_rows(SAMPLE_TRAIN, labelled=True)] * 2, ignore_index=True)  # duplicates too
    one, used_one = predict(tiny_pipeline["bundle"], manifest, space, df, batch_size=16)
    two, used_two = predict(tiny_pipeline["bundle"], manifest, space, df, batch_size=16, devices=2)
    assert used_one == used_two == [m["name"] for m in manifest["members"]]
    assert np.array_equal(one, two)


def test_two_workers_report_where_they_ran_and_their_log_lines_reach_the_parent(tiny_pipeline, caplog):
    """With one worker per GPU (Kaggle's two T4s) the provider came back as None, so a worker whose session fell
    back to the CPU never switched the plan, and the workers' error lines went to their own stderr only."""
    import logging

    from runtime.engine import CPU, DevicePool, onnx_forward

    model = tiny_pipeline["bundle"] / load_manifest(tiny_pipeline["bundle"])["members"][0]["files"]["model"]
    seqs = [[2, 5 + i % 7, 3] + [9] * (i % 5) for i in range(64)]
    pool = DevicePool(partial(onnx_forward, str(model)), 2)
    with caplog.at_level(logging.INFO, logger="mapbuild"):
        try:
            run_batches(pool, seqs, 0, batch_size=8)
        finally:
            pool.shutdown()
    assert pool.provider == CPU and pool.providers == {CPU}
    assert caplog.text.count(f"{model} on {CPU}") == 2  # each worker's own line, logged by the parent


def test_workers_share_the_visible_gpus_round_robin():
    """Two workers on one GPU (bench/gpu_check.py's two-worker run) must both ask for device 0, not 0 and 1."""
    from runtime.engine import worker_devices

    assert worker_devices(2, 2) == [0, 1] and worker_devices(2, 1) == [0, 0] and worker_devices(4, 2) == [0, 1, 0, 1]
    assert worker_devices(2, 0) == [0, 0]


def test_gpu_count_reads_cuda_visible_devices(monkeypatch):
    from runtime.engine import gpu_count

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert gpu_count() == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert gpu_count() == 0


def test_the_first_batch_is_profiled_once_to_count_where_each_node_ran(tiny_pipeline, tmp_path, monkeypatch):
    """A CUDA session runs every node without a CUDA kernel on the CPU and still reports CUDA: the first batch's
    profile counts nodes per provider, and compute nodes on the CPU are the loud CPU FALLBACK line."""
    import tempfile
    from collections import Counter

    from runtime.engine import CPU, CUDA, cpu_fallback, onnx_forward

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = tiny_pipeline["onnx-int8"] / "model.onnx"
    forward = onnx_forward(model, profile_first=True)
    seqs = [[2, 5, 6, 3], [2, 7, 3]]
    first = forward(*pad(seqs, 0))
    placed = forward.placement[CPU]
    assert {"QAttention", "DynamicQuantizeLinear"} <= set(placed) and not list(tmp_path.iterdir()), placed
    assert np.array_equal(forward(*pad(seqs, 0)), first) and forward.placement[CPU] == placed
    del forward  # a session still profiling writes its profile when it closes
    assert not list(tmp_path.iterdir())
    line = cpu_fallback({CUDA: Counter({"Shape": 3}), CPU: Counter({"Shape": 2, "MatMulInteger": 12, "QAttention": 2, "Gather": 1})})
    assert line.startswith("CPU FALLBACK: 14 compute nodes") and "MatMulInteger x12, QAttention x2" in line
    assert cpu_fallback({CUDA: Counter({"MatMul": 12}), CPU: Counter({"Shape": 4, "Gather": 2})}) is None
    assert onnx_forward(model).placement is None  # a CPU session is not profiled


class Unwritable(io.StringIO):
    """A stderr whose reader is gone: every write and flush is EPIPE."""

    def write(self, s):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")


def closed() -> io.StringIO:
    s = io.StringIO()
    s.close()
    return s


@pytest.mark.parametrize("stderr", [Unwritable, closed, lambda: None], ids=["broken", "closed", "none"])
def test_a_progress_bar_that_cannot_write_costs_no_batch(monkeypatch, stderr):
    """Before, the bar's first write raised out of run_batches (tqdm itself survives only a closed file), and the
    member was skipped for the label prior."""
    seqs = [[1] * n for n in (4, 1, 6, 2, 5)]
    forward = lambda ids, mask: mask.sum(1, keepdims=True).astype(np.float32)
    monkeypatch.setattr(sys, "stderr", stderr())
    assert run_batches(forward, seqs, 0, batch_size=2)[:, 0].tolist() == [4, 1, 6, 2, 5]
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    run_batches(forward, seqs, 0, batch_size=2, desc="counted")
    assert "counted: 100%" in sys.stderr.getvalue()  # a writable stderr still gets the bar
