"""The shape of the code base, checked: imports run only downward between the layers of `ipadapter_jax`, the
wheel installs one top-level package (with the presets and the tiny base's weights), files stay small and the
training loop short.

Layers, from the ground up (a module may import its own layer and the ones below):

    ipadapter_jax (the package root), quiet, choices, sharding, paths, staging, locks, presets
    models
    weights, data
    pipelines
    evaluation
    training
    cli (and the package's __main__)
    testing (fixtures of the tests, benchmarks and demo: may use anything)
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ipadapter_jax"
LAYERS = [
    {"ipadapter_jax", "quiet", "choices", "sharding", "paths", "staging", "locks", "presets"},
    {"models"},
    {"weights", "data"},
    {"pipelines"},
    {"evaluation"},
    {"training"},
    {"cli", "__main__"},
    {"testing"},
]
MAX_LINES = 400
MAX_TRAIN_LINES = 60


def _layer(module: str) -> int:
    """Layer of a dotted module name inside ipadapter_jax (`ipadapter_jax.models.unet` -> 1)."""
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else "ipadapter_jax"
    for index, members in enumerate(LAYERS):
        if name in members:
            return index
    raise AssertionError(f"{module}: not in any layer of {LAYERS}; add its folder to the layer list")


def _module_name(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, function-local ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def _package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_imports_only_go_downward():
    upward = []
    for path in _package_files():
        own = _layer(_module_name(path))
        for line, module in _imports(path):
            if module.split(".")[0] in ("training", "conversion", "evaluation", "tests"):
                upward.append(f"{path.relative_to(ROOT)}:{line} imports the repository folder module {module}")
            elif module.startswith("ipadapter_jax.") and module.count(".") >= 1:
                try:
                    target = _layer(module)
                except AssertionError:
                    continue  # `from ipadapter_jax.x import name`: the module itself is checked
                if target > own:
                    upward.append(f"{path.relative_to(ROOT)}:{line} (layer {own}) imports {module} (layer {target})")
    assert not upward, "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    """The layering check can fail: a models module importing the pipelines is reported."""
    bad = PACKAGE / "models" / "_layout_probe.py"
    bad.write_text("from ipadapter_jax.pipelines.pipeline import IPAdapterPipeline\n")
    try:
        with pytest.raises(AssertionError, match="_layout_probe.py:1 \\(layer 1\\) imports ipadapter_jax.pipelines"):
            test_imports_only_go_downward()
    finally:
        bad.unlink()


def test_files_are_small():
    folders = [PACKAGE, ROOT / "training", ROOT / "conversion", ROOT / "tests", ROOT / "bench"]
    long = {
        str(path.relative_to(ROOT)): n
        for folder in folders
        for path in folder.rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_the_training_loop_is_short():
    from ipadapter_jax.training.loop import train

    lines = len(inspect.getsource(train).splitlines())
    assert lines <= MAX_TRAIN_LINES, f"train() has {lines} lines"


def test_the_wheel_installs_only_ipadapter_jax(tmp_path):
    """`pip wheel` of the project: every file under ipadapter_jax/ (or the wheel's metadata), presets and the tiny
    base's weights included."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"ipadapter_jax"}, tops
    assert {
        "ipadapter_jax/presets/sd15.py",
        "ipadapter_jax/presets/demo.py",
        "ipadapter_jax/presets/default.py",
    } <= set(names)
    assert "ipadapter_jax/weights/assets/tiny_base/unet.msgpack" in names
