"""The package's shape, checked: imports follow the layer order, the method imports nothing else of slora, the
README's Layout section names exactly the files of slora/, and tests/ mirrors slora/.

The layers, bottom up (README, Layout). A module may import slora modules of its own layer or of a lower one:

    method, errors   the paper (torch, numpy and itself only) | the error types (nothing of slora)
    models           forward passes, the LoRA layer, target selection
    io               weights, model folders, adapters, GGUF, assets, merge
    data             tasks, text and chat rendering, task scores
    dist             torchrun: process group, data parallelism, sharded loading, calibration over ranks
    train            the training loop, its loss, evaluation, the run folder, resume points
    cli              the commands and their error runner
    entry            python -m slora.<command>: the thin modules at the top of slora/
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "slora"
RANK = {"method": 0, "errors": 0, "models": 1, "io": 2, "data": 3, "dist": 4, "train": 5, "cli": 6, "entry": 7}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def layer(module: str) -> str:
    """slora.method.hessian -> method; slora.errors -> errors; slora.finetune (a top-level entry) -> entry."""
    parts = module.split(".")
    if len(parts) == 1:
        return "entry"  # slora/__init__.py
    if parts[1] in RANK and parts[1] != "entry":
        return parts[1]
    return "entry"


def slora_imports(source: str) -> list[str]:
    """The slora modules (or packages) a source file imports, at any depth (function-local imports too)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("slora"):
            out += [node.module] if node.module != "slora" else [f"slora.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name == "slora" or a.name.startswith("slora.")]
    return out


def violations(module: str, imports: list[str]) -> list[str]:
    """The imports of `module` that point against the layer order."""
    me, bad = layer(module), []
    for target in imports:
        other = layer(target)
        if me == "method" and other != "method":
            bad.append(f"{module} (method) imports {target}: the method imports nothing else of slora")
        elif me == "errors" and target != module:
            bad.append(f"{module} (errors) imports {target}: the error types import nothing of slora")
        elif RANK[other] > RANK[me]:
            bad.append(f"{module} ({me}) imports {target} ({other}), a higher layer")
    return bad


def package_modules() -> dict[str, list[str]]:
    return {module_name(p): slora_imports(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def test_imports_follow_the_layer_order():
    modules = package_modules()
    assert sum(map(len, modules.values())) > 100  # the check reads the real imports, not an empty list
    bad = [v for m, imps in modules.items() for v in violations(m, imps)]
    assert not bad, "\n".join(bad)


def test_the_method_layer_imports_only_itself_torch_numpy_and_the_standard_library():
    import sys
    allowed = {"torch", "numpy", "slora"} | set(sys.stdlib_module_names)
    for path in sorted((PACKAGE / "method").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for name in names:
                top = name.split(".")[0]
                assert top in allowed and (top != "slora" or name.startswith("slora.method")), (path, name)


@pytest.mark.parametrize("module,imports,culprit", [
    ("slora.method.hessian", ["slora.models.lora"], "the method imports nothing else"),
    ("slora.method.sensitivity", ["slora.dist.process_group"], "the method imports nothing else"),
    ("slora.models.lora", ["slora.train.loop"], "a higher layer"),
    ("slora.io.weights", ["slora.data.tasks"], "a higher layer"),
    ("slora.errors", ["slora.cli.runner"], "import nothing of slora"),
    ("slora.train.loop", ["slora.finetune"], "a higher layer"),
])
def test_the_checker_flags_an_arrow_against_the_order(module, imports, culprit):
    assert any(culprit in v for v in violations(module, imports))
    assert not violations("slora.cli.finetune", ["slora.method.hessian", "slora.errors", "slora.train.loop"])


# -----------------------------------------------------------------------------
# The README's Layout section against the tree

def readme_layout() -> set[str]:
    """Paths (relative to the repository) that README.md's "## Layout" code blocks name under slora/: a line
    `slora/<folder>/  ...` opens a folder, and each indented `<name>.py` after it names a file of that folder;
    `slora/<name>.py` names a top-level file."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Layout", 1)[1].split("\n## ", 1)[0]
    block = "\n".join(section.split("```")[1::2])  # the text of every code block
    named, folder = set(), None
    for line in block.splitlines():
        if m := re.match(r"(slora/(?:\w+/)*)(\S*)", line):
            folder, rest = m[1], m[2]
            if rest:
                named.add(folder + rest)
            else:
                named.add(folder.rstrip("/") + "/__init__.py")
        elif folder and (m := re.match(r"\s+(\w+\.py)\b", line)):
            named.add(folder + m[1])
        elif line and not line[0].isspace():
            folder = None
    return named


def test_readme_layout_names_exactly_the_package_files():
    on_disk = {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")}
    named = readme_layout()
    assert on_disk - named == set(), f"files the README's Layout section does not name: {sorted(on_disk - named)}"
    assert named - on_disk == set(), f"files the README's Layout section names but slora/ lacks: {sorted(named - on_disk)}"


# -----------------------------------------------------------------------------
# tests/ mirrors slora/

SUPPORT = ("support", "comparisons", "reference_runs")  # helpers, scripts outside CI, the recorded evidence's tests


def test_tests_mirror_the_packages():
    """tests/<folder>/test_<name>.py exists only for a folder slora/<folder>/ that holds <name>.py, or a module
    whose name starts <name>'s (test_loop_epoch_live.py tests slora/train/loop.py); every folder of slora/ has
    its test folder; test files at the top of tests/ are about the package as a whole."""
    tests = ROOT / "tests"
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    folders = {p.name for p in tests.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))}
    assert packages <= folders, f"packages without a test folder: {sorted(packages - folders)}"
    stray = []
    for folder in sorted(folders - set(SUPPORT)):
        assert folder in packages, f"tests/{folder}/ mirrors no package of slora/"
        modules = {p.stem for p in (PACKAGE / folder).glob("*.py") if p.stem != "__init__"}
        for test in (tests / folder).glob("test_*.py"):
            name = test.stem.removeprefix("test_")
            if not any(name == m or name.startswith(m + "_") for m in modules):
                stray.append(str(test.relative_to(ROOT)))
    assert not stray, f"test files that name no module of their package: {stray}"
    assert sorted(p.name for p in tests.glob("test_*.py")) == ["test_layout.py"]
