"""ONNX graphs of real architectures with random (Kaiming) weights, built
directly with onnx.helper: for timing and scale, not for accuracy claims.

    python tools/synthetic_models.py resnet50 artifacts/onnx/resnet50_random.onnx
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class _Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []
        self.n = 0

    def _name(self, base):
        self.n += 1
        return f"{base}_{self.n}"

    def conv(self, x, name, cin, cout, k, stride=1, pad=None, relu=True):
        pad = k // 2 if pad is None else pad
        fan_in = cin * k * k
        w = (self.rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        b = np.zeros(cout, np.float32)
        self.inits += [numpy_helper.from_array(w, f"{name}.weight"), numpy_helper.from_array(b, f"{name}.bias")]
        y = f"{name}.out"
        self.nodes.append(helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"], [y], name=name,
                                           kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4))
        if relu:
            r = f"{name}.relu"
            self.nodes.append(helper.make_node("Relu", [y], [r], name=f"{name}/relu"))
            return r
        return y

    def op(self, op, inputs, name, **attrs):
        y = f"{name}.out"
        self.nodes.append(helper.make_node(op, inputs, [y], name=name, **attrs))
        return y

    def model(self, x_shape, out, out_shape, name="g", opset=17):
        x = helper.make_tensor_value_info("input", TensorProto.FLOAT, x_shape)
        y = helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)
        g = helper.make_graph(self.nodes, name, [x], [y], initializer=self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="onnx-alds tools")
        m.ir_version = 8
        return m


def resnet50(seed: int = 0, num_classes: int = 1000, image: int = 224) -> onnx.ModelProto:
    """torchvision's ResNet-50 layout (v1.5: stride in the 3×3 conv), BatchNorm
    folded: 53 convs and one fully-connected layer."""
    b = _Builder(seed)
    h = b.conv("input", "conv1", 3, 64, 7, stride=2, pad=3)
    h = b.op("MaxPool", [h], "maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for stage, (width, blocks, stride) in enumerate([(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)], 1):
        for i in range(blocks):
            s = stride if i == 0 else 1
            p = f"layer{stage}.{i}"
            t = b.conv(h, f"{p}.conv1", cin, width, 1)
            t = b.conv(t, f"{p}.conv2", width, width, 3, stride=s)
            t = b.conv(t, f"{p}.conv3", width, width * 4, 1, relu=False)
            short = h if i > 0 else b.conv(h, f"{p}.downsample.0", cin, width * 4, 1, stride=s, relu=False)
            h = b.op("Add", [t, short], f"{p}/add")
            h = b.op("Relu", [h], f"{p}/relu")
            cin = width * 4
    h = b.op("GlobalAveragePool", [h], "avgpool")
    h = b.op("Flatten", [h], "flatten", axis=1)
    w = (b.rng.uniform(-1, 1, (num_classes, cin)) / np.sqrt(cin)).astype(np.float32)
    b.inits += [numpy_helper.from_array(w, "fc.weight"),
                numpy_helper.from_array(np.zeros(num_classes, np.float32), "fc.bias")]
    b.nodes.append(helper.make_node("Gemm", [h, "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1))
    return b.model(["N", 3, image, image], "logits", ["N", num_classes], name="resnet50")


def chain(layers: int = 400, width: int = 16, image: int = 4, seed: int = 0) -> onnx.ModelProto:
    """``layers`` 1×1 convs of ``width`` channels in a row, each followed by a Relu: a graph with
    thousands of small decomposable layers, for timing what grows with the number of layers."""
    b = _Builder(seed)
    h = "input"
    for i in range(layers):
        h = b.conv(h, f"c{i}", width, width, 1, relu=i + 1 < layers)
    return b.model(["N", width, image, image], h, ["N", width, image, image], name="chain")


BUILDERS = {"resnet50": resnet50, "chain": chain}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("arch", help=f"{', '.join(sorted(BUILDERS))}, or chainN (N layers)")
    ap.add_argument("output")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.arch.startswith("chain"):
        m = chain(int(a.arch[len("chain"):] or 400), seed=a.seed)
    elif a.arch in BUILDERS:
        m = BUILDERS[a.arch](seed=a.seed)
    else:
        ap.error(f"unknown architecture {a.arch!r}")
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, a.output)
    print(f"wrote {a.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
