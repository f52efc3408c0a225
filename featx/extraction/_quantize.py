"""int8 static quantisation of an ONNX model with ONNX Runtime's tools, and whether this CPU
has the instructions that keep int8 accurate."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from featx.errors import FeatxError


class ExportError(FeatxError):
    """A backbone cannot be exported to ONNX (or quantised); ``reason`` says why."""

    exit_code = 2


def cpu_has_vnni(cpuinfo: str | None = None, machine: str | None = None) -> bool:
    """Whether this x86 CPU has VNNI (AVX512-VNNI or AVX-VNNI); True on other machines.

    Without VNNI, ONNX Runtime's uint8 x int8 kernels sum pairs of products in int16, which
    saturates: on an AVX2-only EPYC the int8 Lite0 embeddings of two photos fell to cosine
    0.93-0.95 against fp32 (0.997 with VNNI); 7-bit weights (``reduce_range``) gave
    0.985-0.988 at the same speed, uint8 weights 0.995-0.997 at a thirteenth of it.
    """
    import platform

    if (machine or platform.machine()).lower() not in ("x86_64", "amd64", "i686", "x86"):
        return True
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return False  # unknown: assume the worst, reduced range is safe everywhere
    return "avx512_vnni" in cpuinfo or "avx_vnni" in cpuinfo


QUANTIZATION = {
    "method": "onnxruntime.quantize_static", "format": "QDQ", "per_channel": True,
    "weights": "QInt8", "activations": "QUInt8", "calibration": "MinMax",
    "calibration_images": 64,
}


if not cpu_has_vnni():
    # 7-bit weights where int8 products would saturate; only then in the key (and the file
    # name), so the caches and models of machines with VNNI keep theirs
    QUANTIZATION["reduce_range"] = True


POOLING_OPS = ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax")


def quantize(fp32: Path, out: Path, images: np.ndarray, *, float_head: bool = False) -> None:
    """Write the static int8 quantisation (:data:`QUANTIZATION`) of ``fp32`` to ``out``,
    calibrated on ``images`` (fed in the model input's own dtype).

    ``float_head``: keep the last pooling node and everything after it in float (see
    :func:`head_nodes`).
    """
    with tempfile.TemporaryDirectory(dir=Path(out).parent) as work:
        pre = Path(work) / "preprocessed.onnx"  # quant_pre_process output, then quantised
        _quantize(Path(fp32), pre, Path(out), images, float_head)


def head_nodes(graph) -> list[str]:
    """Names of the graph's last pooling node and every node downstream of it.

    Keeping them float spares the pooled embedding and the head one more uint8 rounding.
    Measured on an int8 export of a digits softmax model fitted on fp32 features: labels
    agreeing with fp32 rose from 11% to 28%; the quantised convolutions cost the rest.
    """
    pools = [node for node in graph.node if node.op_type in POOLING_OPS]
    if not pools:
        return []
    names, produced = [pools[-1].name], set(pools[-1].output)
    for node in graph.node:
        if produced.intersection(node.input):
            names.append(node.name)
            produced.update(node.output)
    return names


def _quantize(fp32: Path, pre: Path, out: Path, images: np.ndarray,
              float_head: bool = False) -> None:
    try:
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod,
                                              QuantFormat, QuantType, quantize_static)
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as exc:
        raise ExportError(f"int8 needs onnxruntime's quantisation tools ({exc})") from exc

    import onnx

    graph_input = onnx.load(str(fp32), load_external_data=False).graph.input[0]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(graph_input.type.tensor_type.elem_type)

    class Batches(CalibrationDataReader):
        def __init__(self, name):
            self.batches = iter([{name: images[i:i + 16].astype(dtype)}
                                 for i in range(0, len(images), 16)])

        def get_next(self):
            return next(self.batches, None)

    input_name = graph_input.name
    try:
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=False)
        exclude = head_nodes(onnx.load(str(pre)).graph) if float_head else []
        quantize_static(str(pre), str(out), Batches(input_name),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        reduce_range=QUANTIZATION.get("reduce_range", False),
                        nodes_to_exclude=exclude)
    except Exception as exc:  # noqa: BLE001 - any quantiser failure means "no int8 here"
        raise ExportError(f"int8 quantisation failed: {type(exc).__name__}: {exc}") from exc
