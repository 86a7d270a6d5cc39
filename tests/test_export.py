import numpy as np
import pytest

from builder.errors import MapbuildError
from builder.export import check_drift, measure_drift

REF = np.tile(np.array([[3.0, 2.0, 0.0]], dtype=np.float32), (100, 1))


def test_drift_gate_refuses_a_quantized_model_that_flips_over_one_percent():
    got = REF.copy()
    got[:2] = [2.0, 3.0, 0.0]  # 2 of 100 rows now predict label 1
    drift = measure_drift(got, REF, np.ones_like(REF, dtype=bool))
    assert drift["masked_top1_agreement"] == pytest.approx(0.98) and drift["max_abs_logit_diff"] == 1.0
    with pytest.raises(MapbuildError, match=r"--quantize int8 changes the top-1 prediction of 2.0% of 100 .*--force"):
        check_drift(drift, "int8", force=False)
    check_drift(drift, "int8", force=True)
    check_drift(drift, "fp32", force=False)  # fp32 is the reference precision: recorded, never gated
    check_drift({**drift, "masked_top1_agreement": 0.995}, "int8", force=False)


def test_flips_between_labels_the_mask_removes_do_not_count():
    got = REF.copy()
    got[:50] = [2.0, 3.0, 0.0]
    allowed = np.zeros_like(REF, dtype=bool)
    allowed[:, [0, 2]] = True  # label 1 is never a candidate: the kernel still predicts label 0
    drift = measure_drift(got, REF, allowed)
    assert drift["top1_agreement"] == 0.5 and drift["masked_top1_agreement"] == 1.0
    check_drift(drift, "int8", force=False)
