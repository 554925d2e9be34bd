"""The conv encoder of "group"-norm wav2vec2 checkpoints as int8 matrix products, one scale per row.

wav2vec2-base's conv encoder costs more than its int8 transformer (base, a 2 s segment, one
thread: ~100 ms against ~60). onnxruntime's int8 paths quantise activations with one scale per
tensor, and this encoder has no per-frame normalisation: within one window its activations span
about 40 dB, so a pause quantises to zero and the transformer makes something else of it
(docs/fidelity.md: calibrated static int8 took CTC argmax agreement on speech from 0.945 to
0.66). Here every row of a matrix product, i.e. a few consecutive frames of one layer, gets its
own scale, so quiet frames keep their 8 bits.

Each strided conv becomes matrix products in channels-last layout, with no im2col copy: the
input (frames, C) is viewed as rows of `stride` frames (frames / stride, stride * C), each row is
quantised once, and output t is row t times the taps that row covers plus, for kernel 3 over
stride 2, the first frame of row t + 1 times the last tap. The first layer (one input channel,
10 taps) stays float32, with GroupNorm's shift and scale folded into its weights per batch row.

The graph takes what the fp32 encoder takes (`audio`, `norm_shift`, `norm_scale`; see
models/conv_norm.py) but only audio of 400 + 320 * k samples, the length that yields k + 1
frames with no samples left over (models/frames.py `frame_samples`); the runner trims its input
to that.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# The conv stack this file builds, (kernel, stride) per layer: wav2vec2/HuBERT/WavLM base and
# large all use it.
LAYOUT = ((10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2))
OPSET = 17
_QMAX = 127.0  # symmetric int8 range of the activations (stored as uint8 around 128)
_TINY = 1e-30  # an all-zero row keeps a finite scale


@dataclass(frozen=True)
class ConvStack:
    """What the encoder graph is built from: the conv weights (out, in, kernel) of each layer,
    their strides, and the first layer's GroupNorm affine weights."""

    weights: list[np.ndarray]
    strides: list[int]
    norm_weight: np.ndarray  # (channels,)
    norm_bias: np.ndarray  # (channels,)

    @staticmethod
    def supported(config: object) -> bool:
        """Checkpoints this encoder can stand in for: group norm, GELU, no conv bias, LAYOUT."""
        layout = tuple(zip(getattr(config, "conv_kernel", ()), getattr(config, "conv_stride", ())))
        return (
            getattr(config, "feat_extract_norm", None) == "group"
            and getattr(config, "feat_extract_activation", None) == "gelu"
            and not getattr(config, "conv_bias", True)
            and layout == LAYOUT
        )


class _Graph:
    """Nodes and initializers under unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def const(self, value: np.ndarray | float | int, name: str, dtype: type = np.float32) -> str:
        array = np.asarray(value, dtype=dtype)
        self.initializers.append(numpy_helper.from_array(array, f"{name}:{self._next()}"))
        return self.initializers[-1].name

    def op(self, op_type: str, *inputs: str, **attributes: object) -> str:
        output = f"{op_type.lower()}:{self._next()}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], **attributes))
        return output

    def _next(self) -> int:
        self._count += 1
        return self._count


def _gelu(g: _Graph, x: str) -> str:
    # The erf form that onnxruntime fuses into one Gelu kernel (opset 17 has no Gelu op).
    erf = g.op("Erf", g.op("Div", x, g.const(np.sqrt(2.0), "sqrt2")))
    return g.op("Mul", g.op("Mul", x, g.op("Add", erf, g.const(1.0, "one"))), g.const(0.5, "half"))


def _rows(g: _Graph, x: str, stride: int, channels: int, pad: int) -> str:
    """(batch, frames, channels) -> (batch, rows, stride * channels), `pad` zero frames added."""
    if pad:
        pads = g.const([0, 0, 0, 0, pad, 0], "pads", np.int64)
        x = g.op("Pad", x, pads)
    return g.op("Reshape", x, g.const([0, -1, stride * channels], "shape", np.int64))


def _quantise_rows(g: _Graph, rows: str) -> tuple[str, str]:
    """uint8 rows around 128 and each row's scale (batch, rows, 1)."""
    top = g.op("ReduceMax", rows, axes=[-1], keepdims=1)
    bottom = g.op("ReduceMin", rows, axes=[-1], keepdims=1)
    peak = g.op("Max", top, g.op("Neg", bottom), g.const(_TINY, "tiny"))
    scale = g.op("Mul", peak, g.const(1.0 / _QMAX, "inv_qmax"))
    flat_scale = g.op("Reshape", scale, g.const([-1], "flat", np.int64))
    zero = g.op("Expand", g.const(128, "zero_point", np.uint8), g.op("Shape", flat_scale))
    width = g.op("Slice", g.op("Shape", rows), *_axis_slice(g, -1, None, axis=0))
    flat = g.op("Reshape", rows, g.op("Concat", g.const([-1], "rows", np.int64), width, axis=0))
    quantised = g.op("QuantizeLinear", flat, flat_scale, zero, axis=0)
    return g.op("Reshape", quantised, g.op("Shape", rows)), scale


def _axis_slice(g: _Graph, start: int, end: int | None, axis: int) -> tuple[str, str, str]:
    stop = np.iinfo(np.int64).max if end is None else end
    return (
        g.const([start], "starts", np.int64),
        g.const([stop], "ends", np.int64),
        g.const([axis], "axes", np.int64),
    )


def _int8_weights(g: _Graph, weight: np.ndarray) -> tuple[np.ndarray, str]:
    """(out, in, kernel) -> int8 (kernel * in, out), rows tap-major, and per-column scales."""
    matrix = weight.transpose(2, 1, 0).reshape(-1, weight.shape[0]).astype(np.float64)
    scales = np.maximum(np.abs(matrix).max(axis=0), 1e-12) / _QMAX
    quantised = np.clip(np.round(matrix / scales), -_QMAX, _QMAX).astype(np.int8)
    return quantised, g.const(scales, "weight_scale")


def _conv(g: _Graph, x: str, weight: np.ndarray, stride: int) -> str:
    """One strided conv (kernel 3 or 2, no bias) of channels-last `x`, int8, then GELU."""
    out_channels, channels, kernel = weight.shape
    quantised, column_scale = _int8_weights(g, weight)
    zero = g.const(128, "a_zero_point", np.uint8)
    # Kernel 3, stride 2 over an odd number of frames: one zero frame makes the rows whole; the
    # extra output row it would give is never formed (the last row only lends its first frame).
    rows, scale = _quantise_rows(g, _rows(g, x, stride, channels, pad=kernel - stride))
    if kernel == stride:
        accumulated = g.op("MatMulInteger", rows, g.const(quantised, "weight", np.int8), zero)
        summed = g.op("Mul", g.op("Cast", accumulated, to=TensorProto.FLOAT), scale)
    else:
        assert kernel == stride + 1, (kernel, stride)
        head = g.op("Slice", rows, *_axis_slice(g, 0, -1, axis=1))
        tail = g.op("Slice", rows, *_axis_slice(g, 1, None, axis=1))
        tail = g.op("Slice", tail, *_axis_slice(g, 0, channels, axis=2))
        split = stride * channels
        parts = (
            (head, quantised[:split], g.op("Slice", scale, *_axis_slice(g, 0, -1, axis=1))),
            (tail, quantised[split:], g.op("Slice", scale, *_axis_slice(g, 1, None, axis=1))),
        )
        terms = []
        for part, weights, row_scale in parts:
            accumulated = g.op("MatMulInteger", part, g.const(weights, "weight", np.int8), zero)
            terms.append(g.op("Mul", g.op("Cast", accumulated, to=TensorProto.FLOAT), row_scale))
        summed = g.op("Add", *terms)
    return _gelu(g, g.op("Mul", summed, column_scale))


def _first_layer(g: _Graph, audio: str, stack: ConvStack) -> str:
    """Conv (10 taps, stride 5) with GroupNorm's shift/scale inputs and affine folded in: per
    batch row, y = patches @ (W * a) + b with a = scale * gamma, b = beta - shift * a."""
    weight = stack.weights[0]  # (channels, 1, 10)
    kernel, stride = weight.shape[2], stack.strides[0]
    assert kernel == 2 * stride
    rows = _rows(g, g.op("Unsqueeze", audio, g.const([2], "axes", np.int64)), stride, 1, pad=0)
    head = g.op("Slice", rows, *_axis_slice(g, 0, -1, axis=1))
    tail = g.op("Slice", rows, *_axis_slice(g, 1, None, axis=1))
    patches = g.op("Concat", head, tail, axis=-1)  # (batch, frames, 10)
    gain = g.op("Mul", "norm_scale", g.const(stack.norm_weight, "gamma"))  # (batch, channels)
    offset = g.op("Sub", g.const(stack.norm_bias, "beta"), g.op("Mul", "norm_shift", gain))
    taps = g.const(weight[:, 0, :].T, "first_weight")  # (10, channels)
    per_row = g.op("Mul", g.op("Unsqueeze", gain, g.const([1], "axes", np.int64)), taps)
    out = g.op("MatMul", patches, per_row)
    return _gelu(g, g.op("Add", out, g.op("Unsqueeze", offset, g.const([1], "axes", np.int64))))


def build(stack: ConvStack) -> onnx.ModelProto:
    """The encoder graph: audio (batch, 400 + 320k), norm_shift and norm_scale (batch, C0) ->
    features (batch, k + 1, C_last)."""
    g = _Graph()
    hidden = _first_layer(g, "audio", stack)
    for weight, stride in zip(stack.weights[1:], stack.strides[1:]):
        hidden = _conv(g, hidden, weight, stride)
    g.nodes.append(helper.make_node("Identity", [hidden], ["features"]))
    channels = stack.weights[0].shape[0]
    inputs = [
        helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["batch", "samples"]),
        helper.make_tensor_value_info("norm_shift", TensorProto.FLOAT, ["batch", channels]),
        helper.make_tensor_value_info("norm_scale", TensorProto.FLOAT, ["batch", channels]),
    ]
    output = helper.make_tensor_value_info(
        "features", TensorProto.FLOAT, ["batch", "frames", stack.weights[-1].shape[0]]
    )
    graph = helper.make_graph(g.nodes, "encoder_int8", inputs, [output], g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    return model
