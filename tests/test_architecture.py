"""The package's shape: no import cycles (imports inside functions count), imports flow one way
down the layers, every module states its job, no symlinks, and the wheel runs `sddusr demo`."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# where each module of the installed package lives in the repository (setup.py's mapping)
SOURCES = {"sddusr_engine": ROOT / "sddusr_engine", "sddusr_engine.kernels": ROOT / "kernels"}

# Layers, top to bottom: a module may import its own layer's modules and any lower layer's. The
# engine and training sit side by side on one layer and never import each other.
LAYERS = [
    ("face", ["sddusr_engine"]),
    ("cli", ["sddusr_engine.cli", "console", "cli_errors", "process", "batch_command"]),
    ("commands", ["evaluate", "batch", "profiling", "compare", "distributed", "report"]),
    ("engine", ["engine"]),
    ("training", ["train", "data"]),
    ("edges", ["weights", "io", "registration", "datasets", "synthetic", "metrics"]),
    ("model", ["model"]),
    ("base", ["config", "errors", "geometry", "interrupt", "timing", "shipped"]),
    ("kernels", ["kernels"]),
]
SIDE_BY_SIDE = {("engine", "training"), ("training", "engine")}


def _modules() -> dict[str, Path]:
    found = {}
    for pkg, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if pkg == "sddusr_engine" and parts[:1] == ["kernels"]:
                continue
            found[name] = path
    found["sddusr_engine.cli"] = ROOT / "cli.py"
    return found


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every project module `name` imports, at any depth of its code (not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out: set[str] = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                for a in child.names:
                    if a.name in modules:
                        out.add(a.name)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    anchor = base[: len(base) - (child.level - 1)]
                    target = ".".join(anchor + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                for a in child.names:
                    sub = f"{target}.{a.name}"
                    if sub in modules:
                        out.add(sub)
                    elif target in modules:
                        out.add(target)
            visit(child)

    visit(tree)
    out.discard(name)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer(module: str) -> tuple[int, str]:
    rest = module.removeprefix("sddusr_engine").lstrip(".")
    head = rest.split(".")[0] if rest else ""
    for rank, (layer, names) in enumerate(LAYERS):
        if module in names or head in names:
            return rank, layer
    raise AssertionError(f"{module} is in no layer of tests/test_architecture.py: add it")


def test_the_package_has_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n) :] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                dfs(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m)


def test_the_cycle_check_sees_imports_inside_functions(tmp_path):
    a = tmp_path / "a.py"
    a.write_text("def f():\n    from .b import g\n")
    found = _imports("sddusr_engine.a", a, {"sddusr_engine.a": a, "sddusr_engine.b": a})
    assert found == {"sddusr_engine.b"}


def test_imports_flow_down_the_layers():
    bad = []
    for module, targets in _graph().items():
        rank, layer = _layer(module)
        for t in sorted(targets):
            t_rank, t_layer = _layer(t)
            if t_rank < rank or (layer, t_layer) in SIDE_BY_SIDE:
                bad.append(f"{module} ({layer}) imports {t} ({t_layer})")
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_every_module_states_its_job_and_stays_short():
    for path in _modules().values():
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and len(doc.split()) >= 4, f"{path} has no opening docstring stating its job"
        lines = len(path.read_text().splitlines())
        assert lines <= 650, f"{path} has {lines} lines; split it by job"


def test_no_symlinks_in_the_source_tree():
    links = [
        p
        for folder in ("sddusr_engine", "kernels", "weights", "assets", "tests")
        for p in (ROOT / folder).rglob("*")
        if p.is_symlink()
    ]
    assert not links, f"symlinks in the tree: {links}"


@pytest.mark.slow
def test_a_built_wheel_runs_the_demo_in_a_fresh_venv(tmp_path):
    """The wheel holds the kernels, weights, sample and cli as parts of the package, and a
    fresh virtual environment (dependencies from this interpreter's site) runs `sddusr demo`."""
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels)]
    try:
        import setuptools

        if int(setuptools.__version__.split(".")[0]) >= 69:
            build.append("--no-build-isolation")
    except ImportError:
        pass
    subprocess.run([*build, str(ROOT)], check=True, cwd=tmp_path, timeout=300)
    (wheel,) = wheels.glob("sddusr_engine-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for want in (
        "sddusr_engine/cli.py",
        "sddusr_engine/kernels/patch_match.py",
        "sddusr_engine/pretrained/sddusr_default.safetensors",
        "sddusr_engine/assets/sample/wide.jpg",
        "sddusr_engine/engine/core.py",
    ):
        assert want in names, f"{want} missing from {wheel.name}"

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    # install the wheel into the new environment alone (the dependencies come from the site)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
         "--target", str(_site_packages(py)), str(wheel)],
        check=True, timeout=300,
    )  # fmt: skip
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(
        [str(py), "-c", "import sddusr_engine, sys; print(sddusr_engine.__file__)"],
        cwd=run_dir, env=env, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert str(env_dir) in res.stdout, f"the venv imported {res.stdout.strip()}, not the wheel"
    res = subprocess.run(
        [str(py), "-m", "sddusr_engine.cli", "demo", "--device", "cpu", "--shrink", "4",
         "--outdir", str(run_dir / "demo")],
        cwd=run_dir, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert (run_dir / "demo" / "sr.png").is_file() and (
        run_dir / "demo" / "comparison.png"
    ).is_file()


def _site_packages(py: Path) -> Path:
    out = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return Path(out.stdout.strip())
