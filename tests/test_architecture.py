"""The module map holds: training and inference keep to their sides, the map names every module."""

from __future__ import annotations

import ast
from pathlib import Path

import carcli

PACKAGE = Path(carcli.__file__).resolve().parent
REPO = PACKAGE.parent

# Inference internals: how images are run through the networks.
INFERENCE = {
    "carcli.api",
    "carcli.batch",
    "carcli.engine",
    "carcli.evaluation",
    "carcli.paths",
    "carcli.pictures",
    "carcli.pipeline",
    "carcli.refine",
    "carcli.report",
    "carcli.tasks",
    "carcli.tiler",
    "carcli.tiling",
}
# The training core. Its entry points (train.commands, train.export) may call the public
# inference functions (evaluate_folder for validation, build_processor for timing).
TRAINING_CORE = {
    "carcli.train.average",
    "carcli.train.config",
    "carcli.train.data",
    "carcli.train.ddp",
    "carcli.train.losses",
    "carcli.train.progress",
    "carcli.train.trainer",
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path) -> set[str]:
    """Every carcli module ``path`` imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {n for n in names if n.startswith("carcli")}


def test_training_and_inference_keep_to_their_sides() -> None:
    modules = _modules()
    assert set(modules) >= TRAINING_CORE and set(modules) >= INFERENCE
    for name, path in modules.items():
        imported = _imports(path) & set(modules)
        if name in TRAINING_CORE:
            assert not imported & INFERENCE, f"{name} imports {sorted(imported & INFERENCE)}"
        if not name.startswith("carcli.train") and name != "carcli.cli":
            training = {m for m in imported if m.startswith("carcli.train")}
            assert not training, f"{name} (not training) imports {sorted(training)}"


def test_the_map_names_every_module() -> None:
    """The package docstring and docs/architecture.md list each module, one line each."""
    docs = (REPO / "docs" / "architecture.md").read_text()
    for name in _modules():
        if name == "carcli":
            continue
        short = name.removeprefix("carcli.")
        assert f"`{short}`" in carcli.__doc__, f"{short} missing from carcli's docstring"
        assert f"`{short}`" in docs, f"{short} missing from docs/architecture.md"


def test_the_former_modules_still_export_their_names() -> None:
    """carcli.pipeline and carcli.tiling re-export what moved, for code that imports them."""
    from carcli import engine, evaluation, pipeline, runpolicy, tiler, tiling

    assert pipeline.Processor is engine.Processor
    assert pipeline.evaluate_folder is evaluation.evaluate_folder
    assert (
        tiling.TiledModel is tiler.TiledModel
        and tiling.default_threads is runpolicy.default_threads
    )
    for module in (pipeline, tiling):
        assert all(hasattr(module, name) for name in module.__all__)
