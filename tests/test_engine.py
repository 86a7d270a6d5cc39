
import numpy as np
import pandas as pd

from runtime.data import read_rows
from runtime.engine import batches, pad, run_batches, softmax
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


def test_gpu_count_reads_cuda_visible_devices(monkeypatch):
    from runtime.engine import gpu_count

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert gpu_count() == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert gpu_count() == 0
