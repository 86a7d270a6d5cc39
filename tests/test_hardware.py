import pytest

from builder.errors import MapbuildError
from builder.hardware import Hardware, choose_precision, detect

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


def test_detect_matches_torch():
    import torch

    hw = detect()
    assert (hw.device == "cuda") == torch.cuda.is_available()
    assert hw.count >= 1
