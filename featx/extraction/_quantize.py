"""int8 static quantisation of an ONNX model with ONNX Runtime's tools: the recipe (with the
instruction set it was built for), the quantiser, and each node's measured error."""

from __future__ import annotations

import contextlib
import inspect
import io
import platform
import tempfile
from pathlib import Path

import numpy as np

from featx.errors import FeatxError, UsageError
from featx.options import ExtractOptions


class ExportError(FeatxError):
    """A backbone cannot be exported to ONNX (or quantised); ``reason`` says why."""

    exit_code = 2


X86 = ("x86_64", "amd64", "i686", "x86")


def cpu_has_vnni(cpuinfo: str | None = None, machine: str | None = None) -> bool:
    """Whether this x86 CPU has VNNI (AVX512-VNNI or AVX-VNNI); True on other machines.

    Without VNNI, ONNX Runtime's uint8 x int8 kernels sum pairs of products in int16, which
    saturates: on an AVX2-only EPYC the int8 Lite0 embeddings of two photos fell to cosine
    0.93-0.95 against fp32 (0.997 with VNNI); 7-bit weights (``reduce_range``) gave
    0.985-0.988 at the same speed, uint8 weights 0.995-0.997 at a thirteenth of it.
    """
    if (machine or platform.machine()).lower() not in X86:
        return True
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return False  # unknown: assume the worst, reduced range is safe everywhere
    return "avx512_vnni" in cpuinfo or "avx_vnni" in cpuinfo


def cpu_isa(cpuinfo: str | None = None, machine: str | None = None) -> str:
    """The instruction set an int8 model is built for: "x86-vnni", "x86-novnni" (int8
    products saturate there: 7-bit weights), or the machine's name ("aarch64"...)."""
    machine = (machine or platform.machine()).lower()
    if machine not in X86:
        return machine
    return "x86-vnni" if cpu_has_vnni(cpuinfo, machine) else "x86-novnni"


ISA_NAMES = {"x86-vnni": "x86 with VNNI", "x86-novnni": "x86 without VNNI"}

# ONNX Runtime's calibration methods, by the names featx's options and keys use
CALIBRATION_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
DEFAULT_CALIBRATION = ExtractOptions.int8_calibration
# Through quantize_static, ONNX Runtime's Entropy calibrator gets 128 histogram bins for 128
# quantised ones: its threshold search then has one candidate, the full range, and gave
# MinMax's very models (benchmarks/int8.py). featx computes the Entropy ranges itself with
# the histogram Percentile uses.
ENTROPY_BINS = {"num_bins": 2048, "num_quantized_bins": 128}

QUANTIZATION = {
    "method": "onnxruntime.quantize_static", "format": "QDQ", "per_channel": True,
    "weights": "QInt8", "activations": "QUInt8", "calibration": "MinMax",
    "calibration_images": 64, "isa": cpu_isa(),
}
if QUANTIZATION["isa"] == "x86-novnni":
    # 7-bit weights where int8 products would saturate
    QUANTIZATION["reduce_range"] = True


def recipe(calibration: str = DEFAULT_CALIBRATION) -> dict:
    """The quantisation recipe of this CPU with ``calibration`` (a key of
    :data:`CALIBRATION_METHODS`): what a stored int8 model's key and a cache's key record."""
    if calibration not in CALIBRATION_METHODS:
        raise UsageError(f"unknown calibration {calibration!r}: choose one of "
                         f"{', '.join(CALIBRATION_METHODS)}")
    return {**QUANTIZATION, "calibration": CALIBRATION_METHODS[calibration]}


def isa_mismatch(recorded: dict | None) -> str | None:
    """One line when a recipe was built for another instruction set than this CPU's, else
    None. A recipe from before featx recorded it is judged, on x86, by its 7-bit weights
    (``reduce_range``: built without VNNI); elsewhere only those say it was x86's."""
    if not recorded:
        return None
    here = QUANTIZATION["isa"]
    built = recorded.get("isa")
    if built is None:
        if recorded.get("reduce_range"):
            built = "x86-novnni"
        elif here.startswith("x86"):
            built = "x86-vnni"
        else:
            return None  # unknown: nothing says it was built elsewhere
    if built == here:
        return None
    return (f"an int8 model built for {ISA_NAMES.get(built, built)}, and this CPU is "
            f"{ISA_NAMES.get(here, here)}")


POOLING_OPS = ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax")


def quantize(fp32: Path, out: Path, images: np.ndarray, *, float_head: bool = False,
             quantization: dict | None = None, exclude=()) -> None:
    """Write the static int8 quantisation of ``fp32`` to ``out``, calibrated on ``images``
    (fed in the model input's own dtype), with ``quantization`` (a :func:`recipe`; this
    CPU's MinMax recipe by default) and the nodes ``exclude`` names kept in float.

    ``float_head``: keep the last pooling node and everything after it in float (see
    :func:`head_nodes`).
    """
    with tempfile.TemporaryDirectory(dir=Path(out).parent) as work:
        quantizer = Quantizer(fp32, images, work, quantization or QUANTIZATION,
                              float_head=float_head)
        quantizer.quantize(out, exclude)


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


class Quantizer:
    """One float model prepared for static quantisation once (``quant_pre_process``, and
    the calibration ranges computed once where ONNX Runtime can keep them), then quantised
    with any set of nodes kept in float.

    ``work``: a folder for the prepared model and the calibration ranges.
    """

    def __init__(self, fp32, images: np.ndarray, work, quantization: dict, *,
                 float_head: bool = False):
        import onnx

        self.images, self.quantization = images, quantization
        self.work = Path(work)
        self.prepared = self.work / "prepared.onnx"
        graph_input = onnx.load(str(fp32), load_external_data=False).graph.input[0]
        self.input_name = graph_input.name
        self.dtype = onnx.helper.tensor_dtype_to_np_dtype(
            graph_input.type.tensor_type.elem_type)
        try:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            quant_pre_process(str(fp32), str(self.prepared), skip_symbolic_shape=False)
            graph = onnx.load(str(self.prepared)).graph
        except Exception as exc:  # noqa: BLE001 - any failure means "no int8 here"
            raise ExportError(f"int8 quantisation failed: {type(exc).__name__}: {exc}") from exc
        self.nodes = list(graph.node)
        self.always_float = head_nodes(graph) if float_head else []

    def batches(self, images=None, size: int = 16):
        images = self.images if images is None else images
        return _Batches([{self.input_name: images[i:i + size].astype(self.dtype)}
                         for i in range(0, len(images), size)])

    def quantize(self, out, exclude=()) -> None:
        """Write the quantised model to ``out``, the nodes ``exclude`` names kept float."""
        try:
            from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                                  quantize_static)
        except ImportError as exc:
            raise ExportError(f"int8 needs onnxruntime's quantisation tools ({exc})") from exc
        q = self.quantization
        kwargs = {}
        if "calibration_cache_path" in inspect.signature(quantize_static).parameters:
            kwargs["calibration_cache_path"] = str(self.work / f"ranges-{q['calibration']}.json")
            if q["calibration"] == "Entropy":
                self._entropy_ranges(Path(kwargs["calibration_cache_path"]))
        elif q["calibration"] == "Entropy":
            raise ExportError("entropy calibration needs an onnxruntime whose quantize_static "
                              "takes calibration_cache_path (1.32 does): upgrade it, or use "
                              "--int8-calibration minmax or percentile")
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # its calibrators print
                quantize_static(str(self.prepared), str(out), self.batches(),
                                quant_format=QuantFormat.QDQ, per_channel=q["per_channel"],
                                activation_type=QuantType.QUInt8,
                                weight_type=QuantType.QInt8,
                                calibrate_method=getattr(CalibrationMethod, q["calibration"]),
                                reduce_range=q.get("reduce_range", False),
                                nodes_to_exclude=[*self.always_float, *exclude], **kwargs)
        except Exception as exc:  # noqa: BLE001 - any quantiser failure means "no int8 here"
            raise ExportError(f"int8 quantisation failed: {type(exc).__name__}: {exc}") from exc

    def _entropy_ranges(self, path: Path) -> None:
        """ONNX Runtime's Entropy ranges, with :data:`ENTROPY_BINS`, written where
        ``quantize_static`` reads its calibration cache (once per quantiser)."""
        if path.is_file():
            return
        from onnxruntime.quantization.calibrate import (CalibrationMethod, create_calibrator,
                                                        save_tensors_data)

        calibrator = create_calibrator(self.prepared, None,
                                       augmented_model_path=str(self.work / "entropy.onnx"),
                                       calibrate_method=CalibrationMethod.Entropy,
                                       extra_options=ENTROPY_BINS)
        with contextlib.redirect_stdout(io.StringIO()):
            calibrator.collect_data(self.batches())
            save_tensors_data(calibrator.compute_data(), path)

    def node_errors(self, quantized, images: np.ndarray) -> tuple[dict, dict]:
        """Each measured node's own error on ``images``, and its segment.

        ONNX Runtime's QDQ debugging tools give the signal-to-noise ratio (dB) of the int8
        model's activations against the float model's at every quantised tensor. A node's
        error is how far that ratio falls from its nearest measured inputs to its output;
        its segment is the node plus the unmeasured nodes between them (the Conv under a
        fused Relu6), the nodes to keep float together. Returns ({node: dB}, {node: [names]}).
        """
        from onnxruntime.quantization.qdq_loss_debug import (
            collect_activations, compute_activation_error, create_activation_matching,
            modify_model_output_intermediate_tensors)

        activations = []
        for name, model in (("float", self.prepared), ("int8", Path(quantized))):
            augmented = self.work / f"debug-{name}.onnx"
            modify_model_output_intermediate_tensors(str(model), str(augmented))
            activations.append(collect_activations(str(augmented), self.batches(images, 4)))
            augmented.unlink()
        matched = create_activation_matching(activations[1], activations[0])
        sqnr = {name: min(errors["xmodel_err"], CLEAN_DB)
                for name, errors in compute_activation_error(matched).items()
                if "xmodel_err" in errors}
        producer = {out: node for node in self.nodes for out in node.output}
        drops, segments = {}, {}
        for node in self.nodes:
            if node.name in self.always_float or not node.output or node.output[0] not in sqnr:
                continue
            before, segment = _measured_inputs(node, sqnr, producer)
            drops[node.name] = before - sqnr[node.output[0]]
            segments[node.name] = [n for n in segment if n not in self.always_float]
        return drops, segments


CLEAN_DB = 200.0  # a tensor with no measurable error (the graph's input, say)


def _measured_inputs(node, sqnr, producer):
    """The lowest ratio among ``node``'s nearest measured inputs, and the node plus the
    unmeasured nodes walked through to reach them."""
    segment, ratios, stack, seen = [node.name], [], list(node.input), set()
    while stack:
        tensor = stack.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        if tensor in sqnr:
            ratios.append(sqnr[tensor])
        elif tensor in producer:
            segment.append(producer[tensor].name)
            stack.extend(producer[tensor].input)
        # else: a graph input or an initializer (weights): nothing to walk
    return min(ratios, default=CLEAN_DB), segment


class _Batches:
    """ONNX Runtime's CalibrationDataReader over a list of feeds (its base class is
    imported here lazily, with the quantiser)."""

    def __init__(self, feeds):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)

    def __iter__(self):
        return iter(self.get_next, None)
