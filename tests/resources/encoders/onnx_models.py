"""Tiny ONNX encoders written with onnx.helper (no torch export, so tests stay fast).

``make_onnx(path, ...)`` frames the audio with a strided Conv (hop = kernel = ``hop`` samples, right
padding so a clip of n samples owns ceil(n / hop) frames) and optionally returns a frame mask computed
from the sample mask the same way. Flags inject one contract break each.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def make_onnx(
    path: Path,
    *,
    dim: int = 8,
    hop: int = 320,
    mask_input: bool = True,
    mask_output: bool = True,
    out_float16: bool = False,
    nan: bool = False,  # Log of a signed output: NaN
    rank2: bool = False,  # [B, T] instead of [B, T, D]
    random: bool = False,  # adds RandomNormalLike noise
    ignores_mask: bool = False,  # subtracts the mean over all frames, padding included
    sample_mask_out: bool = False,  # returns the [B, S] sample mask as the "frame" mask
    loop_iterations: int = 0,  # a busy Loop before the output (for wall-clock limits)
    external_data: bool = False,  # store the weight outside the file
    reflect_edge: bool = False,  # reflect-pads the clip's end (as a centred STFT does): padding changes the last frame
    batch_mean: bool = False,  # adds the mean over the batch: items of a batch change each other
    clip_level: bool = False,  # one frame per clip: the mean over time (pair with mask_output=False)
    gain: float = 1.0,  # scales the features (range tests)
    batch_one: bool = False,  # folds the batch into time: only a batch of one clip comes out right
) -> Path:
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((dim, 1, hop)) / np.sqrt(hop)).astype(np.float32)
    inits = [
        numpy_helper.from_array(weight, "W"),
        numpy_helper.from_array(np.ones((1, 1, hop), np.float32), "ONES"),
        numpy_helper.from_array(np.array([1], np.int64), "AX1"),
    ]
    nodes = [helper.make_node("Unsqueeze", ["audio", "AX1"], ["x"])]  # [B, 1, S]
    if reflect_edge:
        inits.append(numpy_helper.from_array(np.array([0, 0, 0, 0, 0, hop - 1], np.int64), "PADS"))
        nodes += [
            helper.make_node("Pad", ["x", "PADS"], ["xp"], mode="reflect"),
            helper.make_node("Conv", ["xp", "W"], ["c"], strides=[hop]),  # [B, D, T], T = ceil(S / hop)
        ]
    else:
        nodes.append(helper.make_node("Conv", ["x", "W"], ["c"], strides=[hop], pads=[0, hop - 1]))
    nodes.append(helper.make_node("Transpose", ["c"], ["f0"], perm=[0, 2, 1]))  # [B, T, D]
    last = "f0"

    def add(op, inputs, **kw):
        nonlocal last
        out = f"n{len(nodes)}"
        nodes.append(helper.make_node(op, inputs, [out], **kw))
        last = out
        return out

    if nan:
        add("Log", [last])
    if random:
        noise = add("RandomNormalLike", [last], scale=0.1)
        add("Add", ["f0", noise])
    if ignores_mask:
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "AXT"))
        mean = add("ReduceMean", ["f0", "AXT"], keepdims=1)
        add("Sub", ["f0", mean])
    if batch_mean:
        inits.append(numpy_helper.from_array(np.array([0], np.int64), "AXB"))
        before = last
        mean = add("ReduceMean", [before, "AXB"], keepdims=1)
        add("Add", [before, mean])
    if clip_level:
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "AXC"))
        add("ReduceMean", [last, "AXC"], keepdims=1)
    if batch_one:
        inits.append(numpy_helper.from_array(np.array([1, -1, dim], np.int64), "ONE_BATCH"))
        add("Reshape", [last, "ONE_BATCH"])
    if gain != 1.0:
        inits.append(numpy_helper.from_array(np.array(gain, np.float32), "GAIN"))
        add("Mul", [last, "GAIN"])
    if loop_iterations:
        inits += [
            numpy_helper.from_array(np.array(loop_iterations, np.int64), "TRIPS"),
            numpy_helper.from_array(np.array(True), "COND"),
        ]
        body = helper.make_graph(
            [
                helper.make_node("Identity", ["cond_in"], ["cond_out"]),
                helper.make_node("Add", ["acc_in", "acc_in"], ["acc_out"]),
            ],
            "body",
            [
                helper.make_tensor_value_info("i", TensorProto.INT64, []),
                helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, None),
            ],
            [
                helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
                helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, None),
            ],
        )
        zero = add("Mul", [last, "COND_F"])
        inits.append(numpy_helper.from_array(np.array(0.0, np.float32), "COND_F"))
        looped = add("Loop", ["TRIPS", "COND", zero], body=body)
        add("Add", ["f0", looped])
    if rank2:
        inits.append(numpy_helper.from_array(np.array([2], np.int64), "AXD"))
        add("ReduceMean", [last, "AXD"], keepdims=0)
    if out_float16:
        add("Cast", [last], to=TensorProto.FLOAT16)
    nodes.append(helper.make_node("Identity", [last], ["features"]))

    outputs = [
        helper.make_tensor_value_info(
            "features",
            TensorProto.FLOAT16 if out_float16 else TensorProto.FLOAT,
            ["B", "T"] if rank2 else ["B", 1 if clip_level else "T", dim],
        )
    ]
    inputs = [helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["B", "S"])]
    if mask_input:
        inputs.append(helper.make_tensor_value_info("audio_attention_mask", TensorProto.INT64, ["B", "S"]))
    if mask_output:
        if not mask_input:
            raise ValueError("a frame mask is computed from the sample mask")
        if sample_mask_out:
            nodes.append(helper.make_node("Identity", ["audio_attention_mask"], ["frame_mask"]))
            outputs.append(helper.make_tensor_value_info("frame_mask", TensorProto.INT64, ["B", "S"]))
        else:
            inits.append(numpy_helper.from_array(np.array(0.0, np.float32), "ZERO"))
            nodes += [
                helper.make_node("Cast", ["audio_attention_mask"], ["mf"], to=TensorProto.FLOAT),
                helper.make_node("Unsqueeze", ["mf", "AX1"], ["mx"]),
                helper.make_node(
                    "Conv", ["mx", "ONES"], ["mc"], strides=[hop], pads=[0, hop - 1]
                ),  # [B, 1, T]
                helper.make_node("Squeeze", ["mc", "AX1"], ["ms"]),
                helper.make_node("Greater", ["ms", "ZERO"], ["frame_mask"]),  # [B, T] bool
            ]
            outputs.append(helper.make_tensor_value_info("frame_mask", TensorProto.BOOL, ["B", "T"]))
    graph = helper.make_graph(nodes, "tiny_encoder", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    if external_data:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=1024,  # large weights only, as exporters do (small shape constants stay inline)
        )
    else:
        onnx.save_model(model, str(path))
    return path
