"""Make a real ONNX model and the outputs ONNX Runtime (Python) gives for it, for the Rust tests.

usage: make_model.py OUT_DIR FEATURES ROWS [slow]
Writes OUT_DIR/model.onnx (input "x" [N, FEATURES] float32 -> Gemm, Relu, Gemm, Sigmoid ->
output "y" [N, 1]), OUT_DIR/rows.json (ROWS x FEATURES inputs) and OUT_DIR/expected.json
(onnxruntime's CPU output for them, one value per row). Deterministic (fixed seed).
With "slow", the hidden layer also goes through 256 products with one 2048 x 2048 matrix
(16 MB, read 256 times a row): about 180 ms an inference here, for latency tests.
"""
import json, pathlib, sys
import numpy as np, onnx, onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

out = pathlib.Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
f, n, h = int(sys.argv[2]), int(sys.argv[3]), 16
rng = np.random.default_rng(11)
w1 = (rng.standard_normal((f, h)) / np.sqrt(f)).astype(np.float32)
w2 = (rng.standard_normal((h, 1)) / np.sqrt(h)).astype(np.float32)
b1, b2 = np.full(h, 0.1, np.float32), np.zeros(1, np.float32)
weights = [(w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2")]
nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]), helper.make_node("Relu", ["h"], ["r"])]
hidden = "r"
if sys.argv[4:] == ["slow"]:
    wide = 2048
    weights += [((rng.standard_normal((h, wide)) / np.sqrt(h)).astype(np.float32), "up"),
                ((rng.standard_normal((wide, wide)) / np.sqrt(wide)).astype(np.float32), "square"),
                ((rng.standard_normal((wide, h)) / np.sqrt(wide)).astype(np.float32), "down")]
    nodes.append(helper.make_node("MatMul", ["r", "up"], ["s0"]))
    for k in range(256):
        nodes.append(helper.make_node("MatMul", [f"s{k}", "square"], [f"s{k + 1}"]))
    nodes.append(helper.make_node("MatMul", ["s256", "down"], ["slow"]))
    hidden = "slow"
nodes += [helper.make_node("Gemm", [hidden, "w2", "b2"], ["z"]), helper.make_node("Sigmoid", ["z"], ["y"])]
graph = helper.make_graph(
    nodes,
    "mlp",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", f])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
    [numpy_helper.from_array(a, k) for a, k in weights])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
onnx.checker.check_model(model)
onnx.save(model, out / "model.onnx")
rows = rng.standard_normal((n, f)).astype(np.float32)
session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
expected = session.run(["y"], {"x": rows})[0][:, 0]
(out / "rows.json").write_text(json.dumps(rows.tolist()))
(out / "expected.json").write_text(json.dumps(expected.tolist()))
