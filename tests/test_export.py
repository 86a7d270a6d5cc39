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


def test_fragile_ops_run_in_fp32_inside_an_fp16_graph():
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from builder.export import keep_fp32

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 4])
    nodes = [helper.make_node("Tanh", ["x"], ["t"]), helper.make_node("Softmax", ["t"], ["s"]), helper.make_node("Identity", ["s"], ["y"])]
    graph = helper.make_graph(nodes, "g", [x], [y], value_info=[helper.make_tensor_value_info(n, TensorProto.FLOAT16, [2, 4]) for n in ("t", "s")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert keep_fp32(proto) == 2
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    for node in inferred.graph.node:
        if node.op_type in ("Tanh", "Softmax"):
            assert types[node.input[0]] == TensorProto.FLOAT and types[node.output[0]] == TensorProto.FLOAT
    assert inferred.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    value = np.array([[0.1, 2.0, -3.0, 9.5], [4.0, 4.0, 4.0, 4.0]], dtype=np.float16)
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": value})[0]
    t = np.tanh(value.astype(np.float32))
    want = np.exp(t) / np.exp(t).sum(1, keepdims=True)
    assert got.dtype == np.float16 and np.abs(got - want).max() < 1e-3
