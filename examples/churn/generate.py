"""The churn example's model and data: what `make demo` and the end-to-end story run on.

usage: generate.py OUT_DIR [--users N] [--seed S]

Writes, deterministically (fixed seed):
  OUT_DIR/model.onnx          a churn model: input "x" [N, 6] float32 -> "y" [N, 1], the
                              probability that a user cancels. Inputs, in order: tenure
                              (months), monthly_spend, support_calls, hourOfDay, dayOfWeek,
                              isWeekend (the last three computed at request time by the scorer).
  OUT_DIR/users/part-0.parquet   the offline feature table the batch scores: user_id and the six
                              inputs. The request-time columns hold the context the batch
                              scores as of (02:00 on a Tuesday, the CronJob's schedule), which
                              is the freshness a batch prediction trades for its price.
  OUT_DIR/online.json         the online features of every user ({id: {feature: value}}), for
                              the online store (a Redis hash per user, features:{id}); a
                              tenth of the users changed since the batch table was written.
  OUT_DIR/expected.json       ONNX Runtime's output for every user's offline row, to check the
                              batch's predictions against.

The model is a small MLP with hand-set weights that make sense: churn rises with support
calls and spend, falls with tenure; late-night and weekend activity nudge it.
"""
import argparse
import json
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
from onnx import TensorProto, helper, numpy_helper

INPUTS = ["tenure", "monthly_spend", "support_calls", "hourOfDay", "dayOfWeek", "isWeekend"]


def model(path: pathlib.Path) -> None:
    # Standardize each input, one hidden layer of 8, sigmoid out.
    mean = np.array([24.0, 60.0, 1.5, 12.0, 3.0, 0.3], np.float32)
    scale = np.array([1 / 18.0, 1 / 30.0, 1 / 1.5, 1 / 7.0, 1 / 2.0, 1.0], np.float32)
    rng = np.random.default_rng(7)
    direction = np.array([-1.2, 0.6, 1.1, 0.15, 0.05, 0.2], np.float32)
    # Half the hidden units see the risk direction, half its opposite (weighted negatively
    # on the way out), so the ReLU layer passes the signal through on both sides.
    signs = np.array([1, 1, 1, 1, -1, -1, -1, -1], np.float32)
    w1 = (np.outer(direction, signs) * rng.uniform(0.5, 1.0, (6, 8))).astype(np.float32)
    b1 = rng.uniform(-0.1, 0.1, 8).astype(np.float32)
    w2 = (0.45 * signs).reshape(8, 1).astype(np.float32)
    b2 = np.array([-1.3], np.float32)
    nodes = [
        helper.make_node("Sub", ["x", "mean"], ["centred"]),
        helper.make_node("Mul", ["centred", "scale"], ["z"]),
        helper.make_node("Gemm", ["z", "w1", "b1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["y"]),
    ]
    weights = {"mean": mean, "scale": scale, "w1": w1, "b1": b1, "w2": w2, "b2": b2}
    graph = helper.make_graph(
        nodes,
        "churn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", len(INPUTS)])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, path)


def users(n: int, rng: np.random.Generator) -> np.ndarray:
    tenure = rng.gamma(2.0, 12.0, n)
    spend = rng.normal(60.0, 25.0, n).clip(5.0, 300.0)
    calls = rng.poisson(1.5, n).astype(np.float64)
    return np.stack([tenure, spend, calls], axis=1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--users", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    (out / "users").mkdir(parents=True, exist_ok=True)
    model(out / "model.onnx")

    rng = np.random.default_rng(args.seed)
    base = users(args.users, rng)
    ids = [f"user-{i:06d}" for i in range(args.users)]
    # The batch scores as of its schedule: 02:00 on a Tuesday (dayOfWeek 1, Monday = 0).
    context = np.tile(np.array([2.0, 1.0, 0.0]), (args.users, 1))
    offline = np.concatenate([base, context], axis=1).astype(np.float32)
    table = pa.table({"user_id": ids, **{name: offline[:, i] for i, name in enumerate(INPUTS)}})
    pq.write_table(table, out / "users" / "part-0.parquet", row_group_size=4096)

    # Online store: the same users, a tenth of them with newer behaviour (more support calls).
    online = base.copy()
    changed = rng.choice(args.users, args.users // 10, replace=False)
    online[changed, 2] += rng.integers(1, 4, len(changed))
    (out / "online.json").write_text(json.dumps({
        ids[i]: {name: float(online[i, j]) for j, name in enumerate(INPUTS[:3])}
        for i in range(args.users)
    }))

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    expected = session.run(["y"], {"x": offline})[0][:, 0]
    (out / "expected.json").write_text(json.dumps(dict(zip(ids, map(float, expected)))))
    print(f"churn example: {args.users} users, model and data in {out} "
          f"(mean churn probability {float(expected.mean()):.3f})")


if __name__ == "__main__":
    main()
