"""Keras backends (TensorFlow, JAX, PyTorch) and devices: featx's commands on each backend
without TensorFlow, embeddings that agree across backends, a cache shared only where they do,
and one-line errors for a backend or a GPU that is not there.

The JAX and PyTorch tests run in subprocesses (a process has one Keras backend) where
``import tensorflow`` raises; they skip where the backend is not installed.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import TINY, invoke, last_json, make_dataset, write_image, class_image
from featx.errors import CacheError
from featx.extraction import AGREEMENT_TOLERANCE, extract

# run from the TensorFlow backend, which drives the others in subprocesses
pytestmark = pytest.mark.tensorflow_only

OTHER_BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(
    importlib.util.find_spec(b) is None, reason=f"{b} is not installed (pip install {b})"))
    for b in ("jax", "torch")]
TINY_ARGS = ["--backbone", "mobilenet_v2", "--weights", "random", "--input-size", "32"]


def cli_script(body: str, hide=("tensorflow",)) -> str:
    """Python source that makes importing the ``hide`` modules raise ImportError, then runs
    ``body``, where ``run(*args)`` invokes featx's CLI in-process."""
    return f"""
import json, sys, traceback
for name in {list(hide)!r}:
    sys.modules[name] = None  # `import name` now raises ImportError
TENSORFLOW_IMPORTS = []  # where something tried to import TensorFlow (and got ImportError)

class RecordTensorflowImports:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] != "tensorflow":
            return None
        stack = traceback.extract_stack()
        if any(f.filename.endswith(("importlib/util.py", "importlib.util>")) for f in stack):
            return None  # importlib.util.find_spec: asks whether it is installed; no import
        TENSORFLOW_IMPORTS.append("".join(traceback.format_list(stack[-6:-1])))
        raise ImportError("importing tensorflow is not allowed here")

if "tensorflow" not in {list(hide)!r}:
    sys.meta_path.insert(0, RecordTensorflowImports())
from click.testing import CliRunner
from featx.cli import cli

def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return {{"code": result.exit_code, "out": result.stdout, "err": result.stderr}}
""" + body


def run_python(script, backend, **env):
    """Run ``script`` under KERAS_BACKEND=``backend``; the JSON its last line printed."""
    # on the CPU, whatever the machine has: the tests compare with CPU rows
    env = {"CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu", **env}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "KERAS_BACKEND": backend, **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def keras_version():
    import keras

    return keras.__version__


def not_in_cache_dir(tmp_path):
    new = tmp_path / "new.png"
    write_image(new, class_image(1, 99))
    return new


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_commands_run_on_the_backend_without_tensorflow(tmp_path, backend):
    data = make_dataset(tmp_path / "data", per_class=6)
    new = not_in_cache_dir(tmp_path)
    cache, models = tmp_path / "cache", tmp_path / "models"
    tiny = TINY_ARGS + ["--cache-dir", cache]
    script = cli_script(f"""
tiny = {[str(a) for a in tiny]!r}
steps = {{
    "extract": run("extract", {str(data)!r}, *tiny, "--json"),
    "fit": run("fit", {str(data)!r}, *tiny, "--clf", "logistic", "--out", {str(models)!r},
               "--name", "m", "--json"),
    "compare": run("compare", {str(data)!r}, *tiny, "--clf", "logistic", "--clf", "knn",
                   "--report-dir", {str(tmp_path / "report")!r}, "--json"),
    "predict": run("predict", {str(models / "m.skops")!r}, {str(new)!r},
                   {str(data / "cat" / "cat_000.png")!r}, "--json"),
    "backbones": run("backbones", "--json"),
}}
print(json.dumps({{"steps": steps, "tensorflow_imports": TENSORFLOW_IMPORTS,
                  "loaded": "tensorflow" in sys.modules,
                  "backend": "keras" in sys.modules and sys.modules["keras"].backend.backend()}}))
""", hide=())
    result = run_python(script, backend)
    steps = result["steps"]
    assert {name: step["code"] for name, step in steps.items()} == dict.fromkeys(steps, 0), \
        {name: step["err"][-800:] for name, step in steps.items() if step["code"]}
    assert result["tensorflow_imports"] == [] and result["loaded"] is False
    assert result["backend"] == backend
    extracted = json.loads(steps["extract"]["out"].splitlines()[-1])
    assert extracted["n_extracted"] == 12
    assert extracted["computed_by"] == [f"keras/{backend}/cpu"]
    assert f"({backend}, cpu) fp32" in extracted["runtime"]
    assert extracted["device"] == f"CPU ({backend})" and extracted["batch_size"] == 32
    assert json.loads(steps["fit"]["out"].splitlines()[-1])["extract_reused"] is True
    compared = json.loads(steps["compare"]["out"].splitlines()[-1])
    assert {r["clf"] for r in compared["results"]} == {"logistic", "knn"}
    rows = json.loads(steps["predict"]["out"].splitlines()[-1])
    # the new file went through the model on this backend; the cached one was looked up
    assert [r["embedded_by"] for r in rows] == [f"keras {keras_version()} ({backend}, cpu) fp32",
                                                "cache"]
    assert all(r["label"] in ("cat", "dog") for r in rows)
    assert "efficientnet_lite0" in {b["name"] for b in
                                    json.loads(steps["backbones"]["out"].splitlines()[-1])}


def test_embeddings_agree_across_backends_and_a_cache_is_shared(tmp_path):
    """EfficientNet-Lite0 with its real weights: TensorFlow writes the cache, JAX and PyTorch
    each add an image to it (after checking their embeddings of cached images agree), and
    every backend's embeddings of the same files agree to 1e-5 relative (measured: ~2e-6)."""
    others = [b for b in ("jax", "torch") if importlib.util.find_spec(b) is not None]
    if not others:
        pytest.skip("neither jax nor torch is installed")
    data = make_dataset(tmp_path / "data", per_class=3)
    cache = tmp_path / "cache"
    base = dict(backbone="efficientnet_lite0", cache_dir=cache, progress=False,
                runtime="keras")
    features = extract(data, **base)
    assert features.computed_by == ["keras/tensorflow/cpu"]
    reference = dict(zip(features.paths, features.take(np.arange(len(features)))[0]))
    for i, backend in enumerate(others):
        write_image(data / "dog" / f"added_{backend}.png", class_image(1, 50 + i))
        script = f"""
import json, sys
sys.modules["tensorflow"] = None
import featx
f = featx.extract({str(data)!r}, backbone="efficientnet_lite0", cache_dir={str(cache)!r},
                  progress=False)
from featx.backbones import create_backbone
from featx.inference import embed_files
X, errors = embed_files(create_backbone("efficientnet_lite0"),
                        [{str(data)!r} + "/" + p for p in {sorted(reference)!r}])
print(json.dumps({{"n_extracted": f.stats.n_extracted, "computed_by": f.computed_by,
                  "X": X.tolist()}}))
"""
        result = run_python(script, backend)
        assert result["n_extracted"] == 1  # the cached rows were kept
        assert f"keras/{backend}/cpu" in result["computed_by"]
        ours = np.asarray(result["X"], np.float32)
        theirs = np.stack([reference[p] for p in sorted(reference)])
        gap = np.abs(ours - theirs).max() / np.abs(theirs).max()
        assert gap < 1e-5, (backend, gap)
    final = extract(data, **base)
    assert final.stats.n_extracted == 0
    assert final.computed_by == sorted(["keras/tensorflow/cpu"] +
                                       [f"keras/{b}/cpu" for b in others])


class Shifted:
    """A mapper new to a cache, whose embeddings differ from the cached ones by ``shift``
    times their largest value."""

    runtime = "shifted"

    def __init__(self, mapper, shift):
        self.mapper, self.shift = mapper, shift

    def __call__(self, images):
        out = np.asarray(self.mapper(images), np.float32)
        return out + np.float32(self.shift) * np.abs(out).max()


def test_a_runtime_that_disagrees_never_adds_rows(tmp_path):
    from featx.backbones import create_backbone
    from featx.cache import FeatureCache
    from featx.extraction import KerasMapper

    data = make_dataset(tmp_path / "data", per_class=4)
    first = extract(data, cache_dir=tmp_path / "c", progress=False, runtime="keras", **TINY)
    make_dataset(data, per_class=1, start=10)
    keras_mapper = KerasMapper(create_backbone("mobilenet_v2", weights="random", input_size=32,
                                               seed=42), 8)
    with pytest.raises(CacheError, match=r"shifted differs on 8 cached images by 0.01"):
        extract(data, cache_dir=tmp_path / "c", progress=False,
                mapper=Shifted(keras_mapper, 1e-2), **TINY)
    with FeatureCache.open(first.cache_path) as cache:
        assert cache.n_rows == 8 and cache.json_attr("computed_by") == ["keras/tensorflow/cpu"]
    ok = extract(data, cache_dir=tmp_path / "c", progress=False,
                 mapper=Shifted(keras_mapper, AGREEMENT_TOLERANCE / 10), **TINY)
    assert ok.stats.n_extracted == 2
    assert ok.computed_by == ["keras/tensorflow/cpu", "shifted"]


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_a_backend_that_is_not_installed_is_one_line(tmp_path, backend):
    data = make_dataset(tmp_path / "data", per_class=2)
    script = cli_script(f"""
print(json.dumps(run("extract", {str(data)!r}, *{TINY_ARGS!r}, "--cache-dir",
                     {str(tmp_path / "c")!r})))
""", hide=(backend,))  # not installed, as far as this process can tell
    result = run_python(script, backend)
    assert result["code"] == 2
    assert result["err"] == (f"Error: KERAS_BACKEND={backend}, but {backend} is not installed: "
                             f"pip install {backend} (or set KERAS_BACKEND=tensorflow)\n")


def test_an_unsupported_backend_is_one_line(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=2)
    script = cli_script(f"""
print(json.dumps(run("extract", {str(data)!r}, *{TINY_ARGS!r}, "--runtime", "keras",
                     "--cache-dir", {str(tmp_path / "c")!r})))
""")
    result = run_python(script, "numpy")
    assert (result["code"], result["err"]) == (
        2, "Error: KERAS_BACKEND=numpy: featx runs on tensorflow, jax, torch\n")


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
def test_gpu_asked_for_where_none_is_visible_is_one_line(tmp_path):
    from featx.extraction import gpu_present

    if gpu_present():
        pytest.skip("this machine has a GPU")
    data = make_dataset(tmp_path / "data", per_class=2)
    result = invoke("extract", data, *TINY_ARGS, "--cache-dir", tmp_path / "c", "--device", "gpu")
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: --device gpu: tensorflow sees no GPU on this machine")
    assert len(result.stderr.strip().splitlines()) == 1
    script = cli_script(f"""
print(json.dumps(run("extract", {str(data)!r}, *{TINY_ARGS!r}, "--device", "gpu",
                     "--cache-dir", {str(tmp_path / "c")!r})))
""")
    result = run_python(script, "jax")
    assert result["code"] == 2
    assert result["err"].startswith("Error: --device gpu: jax sees no GPU on this machine")
    assert len(result["err"].strip().splitlines()) == 1


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
def test_onnx_on_another_backend_needs_an_export_stored_by_tensorflow(tmp_path, monkeypatch):
    store = tmp_path / "onnx"  # this test's own: the session's store has the tiny export
    monkeypatch.setenv("FEATX_ONNX_STORE", str(store))
    data = make_dataset(tmp_path / "data", per_class=2)

    def script(*asks):
        return cli_script(f"""
print(json.dumps([run("extract", {str(data)!r}, *{TINY_ARGS!r}, *ask,
                      "--cache-dir", {str(tmp_path / "c")!r}, "--json") for ask in {asks!r}]))
""")

    for refused in run_python(script(["--runtime", "onnx"], ["--precision", "int8"]), "jax"):
        assert refused["code"] == 2
        assert refused["err"] == (
            "Error: mobilenet_v2: the ONNX export runs on Keras' TensorFlow backend "
            "(KERAS_BACKEND=jax here): use --runtime keras, or export once with "
            "KERAS_BACKEND=tensorflow (the export is stored)\n")
    assert not list(store.glob("*.onnx"))
    extract(data, cache_dir=tmp_path / "tf", progress=False, runtime="onnx", **TINY)
    assert list(store.glob("*.onnx"))  # exported once, on TensorFlow
    (reused,) = run_python(script(["--runtime", "onnx"]), "jax")
    assert reused["code"] == 0, reused["err"][-800:]
    out = json.loads(reused["out"].splitlines()[-1])
    assert out["n_extracted"] == 4 and out["computed_by"] == ["onnxruntime/cpu"]


def test_gpu_with_onnx_runtime_is_one_line(tmp_path, monkeypatch):
    from featx.extraction import _runtimes as runtimes
    from featx.extraction import Device

    monkeypatch.setattr(runtimes, "setup_device", lambda requested="auto": Device(
        "gpu", "Stand-in GPU", "tensorflow"))
    data = make_dataset(tmp_path / "data", per_class=2)
    for extra in (["--runtime", "onnx"], ["--precision", "int8"]):
        result = invoke("extract", data, *TINY_ARGS, "--cache-dir", tmp_path / "c",
                        "--device", "gpu", *extra)
        assert result.exit_code == 2
        assert result.stderr == ("Error: --device gpu runs the Keras runtime; ONNX Runtime "
                                 "(--runtime onnx, --precision int8) runs on the CPU here\n")


def test_device_and_batch_size_are_reported(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=2)
    out = last_json(invoke("extract", data, *TINY_ARGS, "--cache-dir", tmp_path / "c",
                           "--runtime", "keras", "--device", "cpu", "--json"))
    assert out["device"] == "CPU (tensorflow)" and out["batch_size"] == 32
    assert out["computed_by"] == ["keras/tensorflow/cpu"]
    text = invoke("extract", data, *TINY_ARGS, "--cache-dir", tmp_path / "c2").stdout
    assert "\ndevice:    CPU\n" in text  # ONNX Runtime on the CPU, no framework loaded


@pytest.mark.parametrize("backend", ["tensorflow", *OTHER_BACKENDS])
def test_mixed_precision_embeddings_stay_close_on_each_backend(backend):
    """The mixed_float16 policy, backend-neutral: the path --mixed-precision takes on a GPU,
    run here on the CPU (where float16 is emulated, so extraction ignores the flag)."""
    script = """
import json, sys
import numpy as np
from featx.backbones import create_backbone
from featx.extraction import mixed_precision
from featx.extraction import KerasMapper
images = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
out = {}
for mixed in (False, True):
    with mixed_precision(mixed):
        mapper = KerasMapper(create_backbone("efficientnet_lite0", input_size=64), 4)
        out[mapper.precision] = mapper(images).tolist()
print(json.dumps(out))
"""
    out = run_python(script, backend)
    fp32, fp16 = (np.asarray(out[k], np.float64) for k in ("fp32", "mixed_float16"))
    cosine = (fp32 * fp16).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(fp16, axis=1)
    assert cosine.min() >= 0.999, (backend, cosine)
    assert np.abs(fp32 - fp16).max() > 0  # float16 really ran


def test_the_gpu_path_keys_mixed_precision_by_backend_and_restores_the_policy(tmp_path,
                                                                               monkeypatch):
    """The GPU path's logic on a stand-in GPU (the model really runs on the CPU): the
    per-device batch size, the device named, mixed_float16 rows in a cache of their own
    keyed by backend, the caller's policy restored, and fp32 rows of the new device checked
    against the CPU rows before they join them."""
    import keras

    from featx.extraction import _runtimes as runtimes
    from featx.extraction import Device

    monkeypatch.setattr(runtimes, "setup_device", lambda requested="auto": (
        Device("cpu", "cpu", "tensorflow") if requested == "cpu"
        else Device("gpu", "Stand-in GPU", "tensorflow")))
    monkeypatch.setattr(runtimes, "gpu_present", lambda: True)
    data = make_dataset(tmp_path / "data", per_class=3)
    cpu = extract(data, cache_dir=tmp_path / "c", progress=False, runtime="keras",
                  device="cpu", **TINY)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")  # the caller's own
    try:
        mixed = extract(data, cache_dir=tmp_path / "c", progress=False, mixed_precision=True,
                        **TINY)
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert mixed.cache_path != cpu.cache_path and mixed.stats.n_extracted == 6
    assert mixed.key == {**cpu.key, "compute_dtype": "mixed_float16",
                         "compute_backend": "tensorflow"}
    assert mixed.stats.device == "Stand-in GPU (tensorflow)" and mixed.stats.batch_size == 128
    assert mixed.stats.runtime.endswith("(tensorflow, Stand-in GPU) mixed_float16")
    make_dataset(data, per_class=1, start=10)
    fp32 = extract(data, cache_dir=tmp_path / "c", progress=False, **TINY)
    assert fp32.cache_path == cpu.cache_path and fp32.stats.n_extracted == 2
    assert fp32.computed_by == ["keras/tensorflow/cpu", "keras/tensorflow/gpu"]
