"""The layout of docs/architecture.md, kept: every featx import points up the order, between
packages and inside each one; a package's private modules are reached only through it;
and every room stays a size one can hold in mind."""

import ast
from pathlib import Path

import featx

PACKAGE = Path(featx.__file__).parent
# The ground floor, then one package per stage of an image's route, then the entry points.
ORDER = ["errors", "options", "_io", "base", "_backend", "_native_logs", "data", "backbones",
         "cache", "extraction", "classifiers", "auditing", "reports", "finetuning", "inference",
         "deploy", "api", "cli", "__main__"]
# Inside a package, a module imports only the modules before it; its __init__ any of them.
MODULES = {
    "data": ["_sample", "_headers", "_images", "_hashing", "_splits", "_exclude", "_folders",
             "augment"],
    "backbones": ["_config", "_registry", "_weights", "torch_pickle", "layers", "_backbone",
                  "efficientnet_lite", "keras_apps"],
    "cache": ["_key", "_shards", "_index", "_session", "_maintenance", "reconcile",
              "_features", "_combined", "_embedding_files"],
    "extraction": ["_devices", "_reader", "_writers", "_engine", "_quantize", "_int8_agreement",
                   "_onnx_store", "_runtimes", "_int8_search", "_int8", "_views", "_ray_engine",
                   "_run", "_extract"],
    "classifiers": ["_uncertainty", "_registry", "_evaluate", "_tuning", "_fit",
                    "_resampling", "_rows", "_compare", "_model_files"],
    "auditing": ["_copies", "_checks", "_findings", "_report"],
    "reports": ["_figures", "_markdown", "_compare_report"],
    "finetuning": ["_inputs", "_model", "_train", "_saved", "_result", "_recipe"],
    "inference": ["_labels", "_features", "_saved_model"],
    "deploy": ["_head", "_source", "_graph", "_write", "_export", "_parity"],
    "cli": ["_app", "_params", "_extract", "_classify", "_finetune", "_deploy", "_audit",
            "_cache", "_demo"],
}
MAX_MODULE_LINES = 500
MAX_FUNCTION_CODE_LINES = 60  # docstrings, comments and blank lines not counted


def _place(path: Path) -> tuple[str, str]:
    """(package or ground-floor module, module inside the package or "")."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0], (parts[1] if len(parts) > 1 else "")


def _sources():
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name != "__init__.py" or path.parent != PACKAGE:
            yield path, ast.parse(path.read_text())


def _targets(node, here: tuple[str, str]) -> list[tuple[str, str]]:
    """(package, module) pairs an import statement names."""
    package = here[0]
    if isinstance(node, ast.ImportFrom) and node.level:
        if node.module:
            return [(package, node.module.split(".")[0])]
        return [(package, alias.name) for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.module:
        dotted = node.module.split(".")
        if dotted == ["featx"]:
            return [(alias.name, "") for alias in node.names
                    if (PACKAGE / f"{alias.name}.py").exists() or (PACKAGE / alias.name).is_dir()]
        if dotted[0] == "featx":
            inner = dotted[2] if len(dotted) > 2 else ""
            if not inner:  # from featx.cache import reconcile: a module by name
                inner = next((a.name for a in node.names
                              if (PACKAGE / dotted[1] / f"{a.name}.py").exists()), "")
            return [(dotted[1], inner)]
    if isinstance(node, ast.Import):
        return [(a.name.split(".")[1], (a.name.split(".") + [""])[2])
                for a in node.names if a.name.startswith("featx.")]
    return []


def _violations():
    for path, tree in _sources():
        here = _place(path)
        for node in ast.walk(tree):
            for target in _targets(node, here):
                problem = _problem(here, target)
                if problem:
                    yield f"{path.relative_to(PACKAGE)}:{node.lineno} {problem}"


def _problem(here, target) -> str:
    (package, module), (other, other_module) = here, target
    if other != package:
        if ORDER.index(other) > ORDER.index(package):
            return f"imports {other}, later in the order"
        if other_module.startswith("_"):
            return f"imports {other}.{other_module}, a private module of another package"
        return ""
    if module in ("", "__init__") or other_module in ("", "__init__"):
        return "" if module in ("", "__init__") else "imports its own package's __init__"
    order = MODULES[package]
    if order.index(other_module) > order.index(module):
        return f"imports {other_module}, later in {package}'s order"
    return ""


def test_every_module_is_placed_in_the_order():
    placed = {_place(path) for path, _ in _sources()}
    assert {package for package, _ in placed} == set(ORDER)
    for package, modules in MODULES.items():
        found = {module for p, module in placed if p == package} - {"__init__"}
        assert found == set(modules), package


def test_imports_only_point_up_the_order():
    assert list(_violations()) == []


def test_no_folder_holds_a_single_module():
    folders = {path.parent for path in PACKAGE.rglob("*.py")} - {PACKAGE}
    alone = [str(folder.relative_to(PACKAGE)) for folder in folders
             if len([p for p in folder.glob("*.py") if p.name != "__init__.py"]) < 2]
    assert alone == []


def test_rooms_stay_small():
    """No module over 500 lines; no function over 60 lines of code."""
    long_modules, long_functions = [], []
    for path, tree in _sources():
        lines = path.read_text().splitlines()
        if len(lines) > MAX_MODULE_LINES:
            long_modules.append(f"{path.relative_to(PACKAGE)}: {len(lines)}")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = _code_lines(node, lines)
                if n > MAX_FUNCTION_CODE_LINES:
                    long_functions.append(f"{path.relative_to(PACKAGE)}:{node.lineno} "
                                          f"{node.name}: {n}")
    assert (long_modules, long_functions) == ([], [])


def _code_lines(node, lines) -> int:
    doc = set()
    if (node.body and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
            and isinstance(node.body[0].value.value, str)):
        doc = set(range(node.body[0].lineno, node.body[0].end_lineno + 1))
    return sum(1 for i in range(node.lineno, node.end_lineno + 1)
               if i not in doc and lines[i - 1].strip()
               and not lines[i - 1].strip().startswith("#"))


def test_the_public_names_of_featx_0_1_are_still_importable():
    for name in ("extract", "Features", "CombinedFeatures", "ExtractStats", "ExtractOptions",
                 "SplitOptions", "create_backbone", "list_backbones", "discover", "fit",
                 "predict", "compare", "audit", "AuditOptions", "finetune", "__version__"):
        assert getattr(featx, name) is not None, name
