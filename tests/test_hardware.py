import pytest

from builder.hardware import Hardware, choose_precision, detect
from runtime.errors import MapbuildError

T4 = Hardware("cuda", "Tesla T4", (7, 5), 2)


@pytest.mark.parametrize(
    "hw, expected",
    [
        (T4, "fp16"),
        (Hardware("cuda", "Tesla V100", (7, 0), 1), "fp16"),
        (Hardware("cuda", "A100", (8, 0), 1), "bf16"),
        (Hardware("cuda", "H100", (9, 0), 8), "bf16"),
        (Hardware("mps", "Apple MPS", None, 1), "fp32"),
        (Hardware("cpu", "CPU", None, 1), "fp32"),
    ],
)
def test_auto_precision_follows_compute_capability(hw, expected):
    assert choose_precision(hw) == expected


def test_requested_precision_is_checked_against_the_hardware():
    assert choose_precision(T4, "fp32") == "fp32"
    with pytest.raises(MapbuildError, match="no native bf16; use fp16"):
        choose_precision(T4, "bf16")
    with pytest.raises(MapbuildError, match="needs a CUDA GPU"):
        choose_precision(Hardware("cpu", "CPU", None, 1), "bf16")


@pytest.mark.parametrize("cuda, mps, expected", [
    (True, False, Hardware("cuda", "Tesla T4", (7, 5), 2)),
    (False, True, Hardware("mps", "Apple MPS", None, 1)),
    (False, False, Hardware("cpu", "CPU", None, 1)),
])
def test_detect_reads_the_device_torch_reports(monkeypatch, cuda, mps, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (7, 5))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert detect() == expected
