"""Which tests exercise a Keras backend.

The README's test command runs the whole suite on TensorFlow, then only the tests marked
``keras`` on JAX: the others (classifiers, cache arithmetic, reports, the audit's maths)
run the same code whatever KERAS_BACKEND says. :func:`mark_keras_tests` marks a test when
its source, its fixtures' or the test helpers' it calls name Keras-facing work, or call into
a Keras-facing featx package. An unmarked test runs inside :func:`backends_hidden`, where
importing keras, tensorflow, jax or torch raises: a test that needs a backend but was not
marked fails at once, instead of silently missing the JAX pass.
"""

import contextlib
import importlib.abc
import inspect
import re
import sys
import traceback

import pytest

KERAS_WORDS = re.compile(
    r"keras|tensorflow|\bjax\b|\btorch\b|\bextract\b|finetun|augment|create_backbone|"
    r"backbones\.layers|\bTINY\b|\bTOY\b|register_toy|export_model|check_export|"
    r"ExportedRunner|Mapper|run_pipeline|map_files|runtimes|choose_runtime|onnx|\bint8\b|"
    r"quantiz|mixed_precision|gpu_present|setup_device|\bDevice\b|"
    r"embed_files|subprocess|sys\.executable|\bdemo\b|predict_images|"
    r"(api|featx)\.(predict|compare|fit|audit|export)\b|"
    r"invoke\(\s*\"(compare|fit|audit|predict|export)\"")
# featx's packages whose functions and classes run Keras (a test that calls one is marked)
KERAS_FACING = ("featx.data.augment", "featx.backbones", "featx.extraction", "featx.finetuning",
                "featx.deploy", "featx.inference")
BACKEND_MODULES = ("keras", "tensorflow", "jax", "torch")
# autouse plumbing every test has; it names ONNX and Keras without running either
EVERY_TESTS_FIXTURES = {"isolated_env", "onnx_store", "no_backend_unless_marked"}


def mark_keras_tests(items):
    test_modules = {"conftest"} | {item.module.__name__.split(".")[0] for item in items}
    for item in items:
        if "keras" not in item.keywords and _exercises_keras(item, test_modules):
            item.add_marker(pytest.mark.keras)


def _exercises_keras(item, test_modules) -> bool:
    helpers, called = set(), set()
    _collect(item.function, test_modules, helpers, called)
    for name, defs in item._fixtureinfo.name2fixturedefs.items():
        for fixturedef in defs if name not in EVERY_TESTS_FIXTURES else ():
            _collect(fixturedef.func, test_modules, helpers, called)
    return (any(module.startswith(KERAS_FACING) for module in called)
            or any(KERAS_WORDS.search(inspect.getsource(obj)) for obj in helpers))


def _collect(obj, test_modules, helpers, called):
    """``obj`` and the test modules' functions and classes it names, transitively, into
    ``helpers``; the modules of the other functions and classes they name into ``called``."""
    if obj in helpers:
        return
    helpers.add(obj)
    code = getattr(obj, "__code__", None)
    names = set(_code_names(code)) if code else set()
    if inspect.isclass(obj):
        names.update(n for member in vars(obj).values()
                     if inspect.isfunction(member) for n in _code_names(member.__code__))
    space = getattr(obj, "__globals__", None) or vars(sys.modules[obj.__module__])
    for name in names:
        target = space.get(name)
        module = getattr(target, "__module__", None) or ""
        if inspect.ismodule(target):
            called.add(target.__name__)
        elif not (inspect.isfunction(target) or inspect.isclass(target)):
            continue
        elif module.split(".")[0] in test_modules:
            _collect(target, test_modules, helpers, called)
        else:
            called.add(module)


def _code_names(code):
    yield from code.co_names
    for const in code.co_consts:
        if inspect.iscode(const):
            yield from _code_names(const)


class _Refuse(importlib.abc.MetaPathFinder):
    def __init__(self, modules, why):
        self.modules, self.why = modules, why

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in self.modules:
            return None
        if any(frame.filename.endswith("importlib/util.py")
               for frame in traceback.extract_stack()):
            return None  # importlib.util.find_spec only asks whether it is installed
        raise ImportError(f"import {name}: {self.why}")


@contextlib.contextmanager
def backends_hidden(modules=BACKEND_MODULES, why="this test is not marked keras, so the JAX "
                    "pass skips it (tests/keras_marker.py)"):
    """``modules`` (keras, tensorflow, jax and torch) unimportable, and out of sys.modules
    as if never imported, so libraries that look there see nothing, until the block ends."""
    hidden = {name: module for name, module in sys.modules.items()
              if name.split(".")[0] in modules}
    for name in hidden:
        del sys.modules[name]
    refuse = _Refuse(modules, why)
    sys.meta_path.insert(0, refuse)
    try:
        yield
    finally:
        sys.meta_path.remove(refuse)
        sys.modules.update(hidden)
