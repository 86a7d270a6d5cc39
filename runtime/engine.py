"""Batched inference: tokenize, sort by length, pad each batch to its own longest row, run."""

from __future__ import annotations

import glob
import json
import logging
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from logging.handlers import QueueHandler, QueueListener
from multiprocessing.queues import Queue
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .plan import Pace
from .progress import progress

log = logging.getLogger("mapbuild")
Forward = Callable[..., np.ndarray]  # a batch's input arrays, in the model's input order -> its outputs


def load_kernel_tokenizer(path: str, max_length: int | None) -> Tokenizer:
    """The bundled tokenizer.json, truncating like training at `max_length` (None: not at all, for a packed member,
    whose rows split_ids cuts) and padding nothing (batches pad themselves)."""
    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.no_truncation() if max_length is None else tok.enable_truncation(max_length)
    return tok


def encode(tok: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(list(texts))]


def batches(lengths: Sequence[int], batch_size: int, sort: bool = True) -> list[np.ndarray]:
    """Row indices per batch; sorted by length, similar rows share a batch and padding nearly vanishes."""
    order = np.argsort(lengths, kind="stable") if sort else np.arange(len(lengths))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) as int64, right-padded to the longest sequence."""
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


def run_batches(
    forward: Forward,
    seqs: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int,
    sort: bool = True,
    dedupe: bool = True,
    desc: str = "infer",
    deadline: float | None = None,
    warmup: int = 1,
) -> np.ndarray:
    """Logits of every row in input order; identical sequences (duplicate rows, stock answers) run once.

    `forward` is a function of one padded batch, or a DevicePool: its workers then take whole batches as they
    free up, so each batch, and so each row's logits, are exactly what one device would compute. With a
    `deadline` (plan.now()), the run's own pace re-plans after every batch once its first `warmup` batches (one
    per worker, which spends it starting up) are back (plan.Pace): a run projected to end past the deadline stops
    with DeadlineError before it wastes the time."""
    first: dict[tuple[int, ...], int] = {}
    inverse = np.array([first.setdefault(tuple(s), len(first)) for s in seqs], dtype=np.int64) if dedupe else np.arange(len(seqs))
    todo = list(first) if dedupe else list(seqs)
    order = batches([len(s) for s in todo], batch_size, sort)
    cost = [len(idx) * max(len(todo[i]) for i in idx) for idx in order]
    return run_feeds(forward, lambda k: pad([todo[i] for i in order[k]], pad_id), order, cost, len(todo), desc, deadline, warmup)[inverse]


def run_feeds(
    forward: Forward,
    build: Callable[[int], tuple[np.ndarray, ...]],
    rows: list[np.ndarray],
    cost: Sequence[int],
    n_rows: int,
    desc: str,
    deadline: float | None = None,
    warmup: int = 1,
    take: Callable[[int, np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """The outputs of `n_rows` rows: batch k's inputs are `build(k)` (the session's inputs in order, input_ids
    first), its outputs, through `take(k, out)` where given, are the rows `rows[k]` (run_batches, runtime.packing).

    A batch is built as the run reaches it, never all up front: a packed batch's mask is [B, 1, T, T] bools, and
    every batch's at once held GiBs, enough for the OOM killer to end the kernel (issue 40). `cost[k]` is batch k's
    padded tokens, known before it is built, for the pace."""
    if isinstance(forward, Executor):  # a DevicePool or SessionThreads: several batches run at once
        results = queued_results(forward, build, len(rows), desc)
    else:
        results = one_by_one(forward, build, len(rows), desc)
    # Cost grows with the tokens of a batch, and sorted batches grow longer: pace by tokens, not rows.
    done = np.cumsum(cost)
    pace = Pace(deadline, float(done[-1]), warmup, desc) if deadline is not None and len(done) else None
    out: np.ndarray | None = None
    for k, (idx, logits) in enumerate(progress(zip(rows, results), desc, len(rows))):
        logits = take(k, logits) if take else logits
        if out is None:
            out = np.empty((n_rows, logits.shape[1]), dtype=np.float32)
        out[idx] = logits
        if pace:
            pace.done(k + 1, float(done[k]))
    return out if out is not None else np.empty((0, 0), dtype=np.float32)


def one_by_one(forward: Forward, build: Callable[[int], tuple[np.ndarray, ...]], n: int, desc: str) -> Iterator[np.ndarray]:
    """The outputs of batches 0 to n - 1, each built only once the one before has run."""
    for k in range(n):
        feed = build(k)
        logits = halving(lambda: forward(*feed), forward, feed, desc)
        del feed  # before the next batch is built, not after: one mask held at a time
        yield logits


def queued_results(pool: DevicePool | SessionThreads, build: Callable[[int], tuple[np.ndarray, ...]], n: int, desc: str) -> Iterator[np.ndarray]:
    """The outputs of batches 0 to n - 1 through a pool's workers, in order, with at most two batches a worker
    queued ahead: enough that a worker freeing up finds the next batch waiting, few enough that a run never holds
    every batch's mask (the pool also pickles each queued batch). A retry in halves queues its halves."""
    queued: deque[tuple[Future, tuple[np.ndarray, ...]]] = deque()
    built = 0
    for _ in range(n):
        while built < n and len(queued) < 2 * pool.workers:
            feed = build(built)
            queued.append((pool.queue(feed), feed))
            built += 1
        future, feed = queued.popleft()
        yield halving(lambda: pool.take(future.result()), pool, feed, desc)


# How onnxruntime (CPU: bad_alloc; CUDA: its arena's "Failed to allocate memory", cudaMalloc's "out of memory") and
# PyTorch ("CUDA out of memory") say a batch did not fit.
OUT_OF_MEMORY = ("out of memory", "failed to allocate memory", "bad_alloc", "bad allocation")


def out_of_memory(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or any(m in str(e).lower() for m in OUT_OF_MEMORY)


def halves(feed: tuple[np.ndarray, ...]) -> list[tuple[np.ndarray, ...]]:
    """A batch cut in two along its rows; a padded batch (input_ids, attention_mask) also to each half's longest row."""
    parts = []
    for half in (slice(0, len(feed[0]) // 2), slice(len(feed[0]) // 2, None)):
        part = tuple(a[half] for a in feed)
        if len(part) == 2:
            width = int(part[1].sum(1).max())
            part = (part[0][:, :width], part[1][:, :width])
        parts.append(part)
    return parts


def halving(first: Callable[[], np.ndarray], again: Forward, feed: tuple[np.ndarray, ...], desc: str) -> np.ndarray:
    """`first()`, the batch's outputs; when it runs out of memory, `again` on each half of the batch (`halves`),
    halving down to one row or pack. Sorted batches put the longest last: one of them must not cost a member hours
    into its run."""
    try:
        return first()
    except Exception as e:
        if len(feed[0]) == 1 or not out_of_memory(e):
            raise
    log.warning("%s: out of memory on a batch of %d x %d tokens; retrying it in halves", desc, *feed[0].shape)
    return np.concatenate([halving(lambda p=p: again(*p), again, p, desc) for p in halves(feed)])


_worker_forward: Forward | None = None


def die_with(parent: int) -> None:
    """On Linux, have the kernel SIGKILL this process when `parent` dies, even by SIGKILL, which no handler of the
    parent's can see: a worker left behind waits forever on a queue it holds both ends of, keeps the caller's stdout
    and stderr open (a caller reading them hangs), and keeps the resource tracker alive by its copy of the tracker's
    pipe. Elsewhere nothing. The signal comes when the parent's thread that started this process ends: with spawn,
    the one that submitted to the pool."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1  # linux/prctl.h
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before the prctl: no signal will ever come
        os._exit(1)


def _init_worker(parent: int, opener: Callable[[int], Forward], devices: Queue, records: Queue) -> None:
    global _worker_forward
    die_with(parent)
    # The worker's log records go to the parent, which logs them as its own: its errors reach the run's faults.
    worker_log = logging.getLogger("mapbuild")
    worker_log.addHandler(QueueHandler(records))
    worker_log.setLevel(logging.INFO)
    _worker_forward = opener(devices.get())


def _pool_forward(batch: tuple[np.ndarray, ...]) -> tuple[np.ndarray, str]:
    return _worker_forward(*batch), _worker_forward.provider


class _Relay(logging.Handler):
    """Logs a worker's record here, as if this process had logged it (its level as this process's logger says)."""

    def emit(self, record: logging.LogRecord) -> None:
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)


def worker_devices(workers: int, gpus: int) -> list[int]:
    """The CUDA device of each worker: one per GPU, round robin when there are more workers (0 without a GPU)."""
    return [i % max(gpus, 1) for i in range(workers)]


class DevicePool(ProcessPoolExecutor):
    """`workers` processes, each with its own model, `opener(i)`: worker i on CUDA device i modulo the visible GPUs
    (so more workers than GPUs share them), or the CPU when there is none. `opener` must pickle (a module function, or
    a functools.partial of one): `partial(onnx_forward, path, threads)` opens an ONNX session. Called on a batch the
    pool is a Forward; `provider` says where the workers ran (the CPU if any one did), and their log lines are logged
    here."""

    def __init__(self, opener: Callable[[int], Forward], workers: int) -> None:
        ctx = mp.get_context("spawn")  # CUDA cannot survive fork
        ids, records = ctx.Queue(), ctx.Queue()
        for device in worker_devices(workers, gpu_count()):
            ids.put(device)
        super().__init__(workers, mp_context=ctx, initializer=_init_worker, initargs=(os.getpid(), opener, ids, records))
        self.workers = workers
        self.providers: set[str] = set()
        self.listener = QueueListener(records, _Relay())
        self.listener.start()

    def queue(self, feed: tuple[np.ndarray, ...]) -> Future:
        return self.submit(_pool_forward, feed)

    def take(self, result: tuple[np.ndarray, str]) -> np.ndarray:
        logits, provider = result
        self.providers.add(provider)
        return logits

    def __call__(self, *feed: np.ndarray) -> np.ndarray:
        return self.take(self.queue(feed).result())

    @property
    def provider(self) -> str | None:
        return CPU if CPU in self.providers else next(iter(self.providers), None)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        super().shutdown(wait, cancel_futures=cancel_futures)
        self.listener.stop()  # after the workers: their last lines still arrive


class SessionThreads(ThreadPoolExecutor):
    """One Forward run from `workers` threads at once, in this process. For an onnxruntime session of one thread:
    a run releases the GIL and a session may run from several threads, so one row a run keeps every core busy with
    one copy of the weights and no process to start (122 rows/s on 2 cores where 2 worker processes ran 110,
    docs/batch-independence.md). Called on a batch, it is that Forward; run_feeds queues batches on it."""

    def __init__(self, forward: Forward, workers: int) -> None:
        super().__init__(workers, thread_name_prefix="session")
        self.forward, self.workers, self.provider = forward, workers, forward.provider

    def queue(self, feed: tuple[np.ndarray, ...]) -> Future:
        return self.submit(self.forward, *feed)

    def take(self, result: np.ndarray) -> np.ndarray:
        return result

    def __call__(self, *feed: np.ndarray) -> np.ndarray:
        return self.forward(*feed)


def cores() -> int:
    """The CPU cores this process may run on (a container's share, where os.cpu_count() gives the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def gpu_count() -> int:
    """Visible NVIDIA GPUs, without CUDA libraries: CUDA_VISIBLE_DEVICES when set, else the device nodes."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and not d.strip().startswith("-")])
    return len(glob.glob("/dev/nvidia[0-9]*"))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def requested_providers(available: Sequence[str], gpus: int, device_id: int = 0) -> list:
    """CUDA device `device_id` then CPU when a GPU is visible and onnxruntime has CUDA; else CPU alone (an
    onnxruntime-gpu wheel on a machine without a GPU would only log CUDA load errors)."""
    if gpus and CUDA in available:
        return [(CUDA, {"device_id": device_id}), CPU]
    return [CPU]


def not_engaged(requested: Sequence, got: Sequence[str]) -> str | None:
    """The loud line for a session asked to run on CUDA that onnxruntime put on another provider, else None."""
    asked = [p[0] if isinstance(p, tuple) else p for p in requested]
    if asked[0] == CUDA and got[0] != CUDA:
        return f"CUDA NOT ENGAGED: asked for {', '.join(asked)}, the session runs on {got[0]}; predictions take CPU time"
    return None


# The ops that carry a model's compute. The CUDA provider puts shape arithmetic on the CPU on purpose; one of these
# on the CPU inside a CUDA session means a node without a CUDA kernel, and a round trip through host memory.
COMPUTE_OPS = ("MatMul", "Gemm", "Attention", "Conv", "LayerNormalization", "Softmax", "Gelu", "QuantizeLinear", "DynamicQuantize")


def node_providers(profile: str | os.PathLike) -> dict[str, Counter]:
    """provider -> op type -> how many nodes ran there, from an onnxruntime profile (a JSON list of trace events)."""
    placed = {}
    for event in json.loads(Path(profile).read_text()):
        args = event.get("args", {})
        if event.get("cat") == "Node" and "provider" in args and "op_name" in args:
            placed[event["name"].removesuffix("_kernel_time")] = (args["provider"], args["op_name"])
    counts: dict[str, Counter] = {}
    for provider, op in placed.values():
        counts.setdefault(provider, Counter())[op] += 1
    return counts


def cpu_fallback(counts: dict[str, Counter]) -> str | None:
    """The loud line for compute nodes of a CUDA session that ran on the CPU, else None."""
    heavy = Counter({op: n for op, n in counts.get(CPU, Counter()).items() if any(k in op for k in COMPUTE_OPS)})
    if not heavy:
        return None
    ops = ", ".join(f"{op} x{n}" for op, n in heavy.most_common())
    return f"CPU FALLBACK: {sum(heavy.values())} compute nodes have no CUDA kernel and run on the CPU ({ops}); predictions take CPU time"


def onnx_forward(path: str, threads: int = 0, device_id: int = 0, gpu: bool = True, profile_first: bool | None = None) -> Forward:
    """An onnxruntime session on CUDA device `device_id` when a GPU is visible and usable (and `gpu`), else CPU. The
    function's `provider` attribute says where the session really runs. `profile_first` (default: on a CUDA
    session) profiles the first batch only, to count where its nodes ran (`placement`) and log CPU FALLBACK: a
    session that reports CUDA still runs on the CPU every node the provider has no kernel for."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    providers = requested_providers(ort.get_available_providers(), gpu_count() if gpu else 0, device_id)
    if providers[0] != CPU and hasattr(ort, "preload_dlls"):  # >= 1.21: the CUDA and cuDNN of the image's torch wheels
        ort.preload_dlls()
    profiling = profile_first if profile_first is not None else providers[0] != CPU
    if profiling:
        # onnxruntime adds only a timestamp in seconds: two sessions of one process in one second would share a file
        opts.enable_profiling, opts.profile_file_prefix = True, os.path.join(tempfile.gettempdir(), f"mapbuild-profile-{uuid.uuid4().hex}")
    try:
        sess = ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as e:  # a broken CUDA install must cost speed, not the submission
        if providers == [CPU]:
            raise
        log.error("CUDA session failed (%s); falling back to CPU", str(e).splitlines()[0])
        sess = ort.InferenceSession(str(path), opts, providers=[CPU])
    loud = not_engaged(providers, sess.get_providers())
    if loud:
        log.error("%s: %s", path, loud)
    log.info("%s on %s", path, sess.get_providers()[0])

    names = [i.name for i in sess.get_inputs()]

    def forward(*feed: np.ndarray) -> np.ndarray:
        nonlocal profiling
        if len(feed) != len(names):  # zip would feed a packed batch's positions as a padded graph's mask
            raise ValueError(f"{Path(path).name} takes {', '.join(names)}, not {len(feed)} inputs; package it again with this mapbuild")
        out = sess.run(["logits"], dict(zip(names, feed)))[0]  # the inputs in the order they were exported
        if profiling:  # ending the profile stops it: one batch's worth of events, then none
            profiling = False
            try:
                profile = Path(sess.end_profiling())
                forward.placement = node_providers(profile)
                profile.unlink(missing_ok=True)
            except Exception as e:  # noqa: BLE001 - a diagnostic must never cost the member
                log.warning("%s: node placement not counted (%s)", path, e)
            line = cpu_fallback(forward.placement) if forward.provider == CUDA and forward.placement else None
            if line:
                log.error("%s: %s", path, line)
        return out

    forward.provider = sess.get_providers()[0]
    forward.inputs = tuple(names)
    forward.placement = None
    return forward
