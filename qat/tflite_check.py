"""Inspect a written .tflite file: which tensors and ops are still float in a "full-int8" file.

The converter silently keeps an op in float when it cannot quantize it (a missing range, an op
without an int8 kernel): the file then holds QUANTIZE/DEQUANTIZE pairs around float compute and
still loads and runs. `inspect_int8_tflite` reads the file back with ai-edge-litert and lists
what is float; `check_full_int8` turns a non-empty list into one `ExportError` line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from qat.errors import ExportError

SHOWN = 3  # offending names quoted in the error line; the rest are counted


@dataclass(frozen=True)
class Int8Inspection:
    """What is float in a .tflite file (subgraph 0, the only one a folded Keras model has).

    float_tensors: names of floating-point tensors (float16/32/64) that some op reads or writes.
    float_ops: "OP(output tensor name)" for every op that reads or writes a float tensor, which
        includes every QUANTIZE from float and every DEQUANTIZE to float. A QUANTIZE from int8 to
        int8 (a requantization) is integer arithmetic and is not listed.
    boundary_ops: with `int8_io=False` only, the QUANTIZE of a model input and the DEQUANTIZE of
        a model output, which float I/O asks for; they, and the float input/output tensors that
        only they touch, are left out of the two lists above.
    """

    float_tensors: list[str] = field(default_factory=list)
    float_ops: list[str] = field(default_factory=list)
    boundary_ops: list[str] = field(default_factory=list)

    @property
    def full_int8(self) -> bool:
        return not self.float_tensors and not self.float_ops


def _is_float(dtype) -> bool:
    return np.issubdtype(np.dtype(dtype), np.floating)


def inspect_int8_tflite(path: str, int8_io: bool = True) -> Int8Inspection:
    """List the float tensors and float ops of the .tflite file at `path`.

    `int8_io=False` means the user asked for float input and output around int8 compute: the
    single QUANTIZE fed by a model input and DEQUANTIZE feeding a model output are expected
    there and reported in `boundary_ops` only. Everything else that touches a float tensor, and
    any QUANTIZE/DEQUANTIZE inside the graph, is listed. A clean full-int8 file gives two empty
    lists.
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    # No default delegate: the ops read back are the file's own, not an XNNPACK partition.
    interpreter = Interpreter(
        model_path=path,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()  # experimental API: name and tensor indices per op
    model_inputs = {d["index"] for d in interpreter.get_input_details()}
    model_outputs = {d["index"] for d in interpreter.get_output_details()}

    def tensors(op, key):
        return [int(i) for i in op[key] if i >= 0 and int(i) in details]

    def is_float(index):
        return _is_float(details[index]["dtype"])

    def label(op):
        outputs = tensors(op, "outputs")
        return f"{op['op_name']}({details[outputs[0]]['name'] if outputs else '?'})"

    boundary = set()
    if not int8_io:
        for op in ops:
            ins, outs = tensors(op, "inputs"), tensors(op, "outputs")
            if op["op_name"] == "QUANTIZE" and ins and set(ins) <= model_inputs and not any(
                    is_float(i) for i in outs):
                boundary.add(op["index"])
            if op["op_name"] == "DEQUANTIZE" and outs and set(outs) <= model_outputs and not any(
                    is_float(i) for i in ins):
                boundary.add(op["index"])

    touched_by: dict[int, set[int]] = {}  # float tensor -> indices of the ops that touch it
    float_ops = []
    for op in ops:
        used = [i for i in tensors(op, "inputs") + tensors(op, "outputs") if is_float(i)]
        for i in used:
            touched_by.setdefault(i, set()).add(op["index"])
        if used and op["index"] not in boundary:
            float_ops.append(label(op))
    io = model_inputs | model_outputs
    float_tensors = [details[i]["name"] for i in sorted(touched_by)
                     if not (i in io and touched_by[i] <= boundary)]
    return Int8Inspection(float_tensors=float_tensors, float_ops=float_ops,
                          boundary_ops=[label(op) for op in ops if op["index"] in boundary])


def _first(names: list[str]) -> str:
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def check_full_int8(path: str, int8_io: bool, allow_float_ops: bool = False) -> Int8Inspection:
    """`inspect_int8_tflite`, raising one-line `ExportError` unless the file is full-int8.

    `allow_float_ops=True` (`export.allow_float_ops`) accepts the file; the lists still go to
    the caller (report.json).
    """
    found = inspect_int8_tflite(path, int8_io)
    if found.full_int8 or allow_float_ops:
        return found
    raise ExportError(
        f"{os.path.basename(path)} is not full-int8: {len(found.float_ops)} op(s) compute in "
        f"float: {_first(found.float_ops)}; {len(found.float_tensors)} float tensor(s): "
        f"{_first(found.float_tensors)}. The converter keeps an op in float when a tensor has no "
        "quantization range or the op has no int8 kernel; export.allow_float_ops=true accepts "
        "such a file")
