"""The import direction of docs/architecture.md: every featx import points up the list."""

import ast
from pathlib import Path

import featx

ORDER = ["errors", "_json", "options", "sample_data", "devices", "data", "shards", "cache", "uncertainty",
         "resampling", "audit_checks", "classifiers", "augment", "backbones", "persist",
         "cache_export", "pipeline", "onnx_export", "reconcile", "reports", "audit_report",
         "runtimes", "ray_engine", "views", "features", "extraction", "inference", "finetuning", "deploy",
         "api", "cli", "__main__"]
PACKAGE = Path(featx.__file__).parent


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0] if parts[0] != "__init__" else ""


def _imported(node) -> list[str]:
    """featx modules an import statement names (featx.backbones.layers -> backbones)."""
    if isinstance(node, ast.ImportFrom) and node.module and not node.level:
        if node.module == "featx":
            return [a.name for a in node.names if (PACKAGE / f"{a.name}.py").exists()
                    or (PACKAGE / a.name).is_dir()]
        if node.module.startswith("featx."):
            return [node.module.split(".")[1]]
    if isinstance(node, ast.Import):
        return [a.name.split(".")[1] for a in node.names if a.name.startswith("featx.")]
    return []


def test_every_module_is_placed_in_the_order():
    modules = {_module(p) for p in PACKAGE.rglob("*.py")} - {""}
    assert modules == set(ORDER)


def test_imports_only_point_up_the_order():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        here = _module(path)
        if not here:
            continue  # featx/__init__.py imports nothing of featx
        for node in ast.walk(ast.parse(path.read_text())):
            for target in _imported(node):
                if target != here and ORDER.index(target) > ORDER.index(here):
                    upward.append(f"{path.relative_to(PACKAGE)}:{node.lineno} imports {target}")
    assert upward == []
