"""Tiny ONNX models built with onnx.helper, for tests that must not depend on the zoo.

Weights are random but fixed by the seed; the "labels" of a synthetic family are the
dense model's own predictions, so its dense accuracy is 1.0 by construction. Tests of
real accuracy use the embedded zoo instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def residual_cnn(*, seed: int = 0, channels: int = 8, blocks: int = 3, classes: int = 5) -> onnx.ModelProto:
    """input [N,1,8,8] -> stem conv+relu -> residual blocks -> global pool -> gemm."""
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def w(name: str, *shape: int, scale: float = 0.3) -> str:
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def conv(x: str, out: str, cin: int, cout: int) -> str:
        nodes.append(helper.make_node("Conv", [x, w(f"{out}.w", cout, cin, 3, 3), w(f"{out}.b", cout, scale=0.05)],
                                      [out], name=out, pads=[1, 1, 1, 1]))
        return out

    def relu(x: str, out: str) -> str:
        nodes.append(helper.make_node("Relu", [x], [out], name=out))
        return out

    h = relu(conv("input", "stem", 1, channels), "stem_relu")
    for b in range(blocks):
        a = relu(conv(h, f"b{b}.c1", channels, channels), f"b{b}.r1")
        c = conv(a, f"b{b}.c2", channels, channels)
        nodes.append(helper.make_node("Add", [h, c], [f"b{b}.add"], name=f"b{b}.add"))
        h = relu(f"b{b}.add", f"b{b}.out")
    nodes.append(helper.make_node("GlobalAveragePool", [h], ["pool"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["pool"], ["flat"], name="flat"))
    nodes.append(helper.make_node("Gemm", ["flat", w("fc.w", classes, channels), w("fc.b", classes)], ["logits"],
                                  name="fc", transB=1))
    graph = helper.make_graph(
        nodes, "residual_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10  # onnx 1.23 writes 14, which onnxruntime 1.31 refuses
    onnx.checker.check_model(model)
    return model


def write_family_data(folder: Path, model: onnx.ModelProto, *, n: int = 96, seed: int = 1) -> None:
    """eval.npz (inputs and the model's own predictions as labels) and calib.npz."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 1, 8, 8)).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"input": x})[0].argmax(-1).astype(np.int64)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "eval.npz", x=x, y=y)
    np.savez(folder / "calib.npz", x=x[:32])


def synthetic_family(folder: Path, *, variants: bool = True):  # noqa: ANN201
    """A family of the residual CNN with dense, 50% unstructured, 25% structured, int8, fp16."""
    from loom.model.variants import init_family, make_variants

    model = residual_cnn()
    write_family_data(folder, model)
    onnx.save(model, folder / "source.onnx")
    family = init_family(folder / "source.onnx", folder, task="synthetic", num_classes=5)
    if variants:
        family = make_variants(family, unstructured=[0.5], structured=[0.25], int8=True, fp16=True)
    return family
