"""The package's floors: one installed `crossview`, services that never import each other, a kernel below them.

| floor    | modules                                                   | may import                 |
|----------|-----------------------------------------------------------|----------------------------|
| app      | `crossview.cli`, `crossview.demo`, `crossview.__main__`   | everything                 |
| services | `crossview.edge`, `crossview.matcher`, `crossview.trainer` | itself and the kernel only |
| kernel   | `crossview.kernel`                                        | itself only                |
"""

from __future__ import annotations

import ast
import doctest
import importlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SERVICES = ("crossview.edge", "crossview.matcher", "crossview.trainer")
KERNEL = "crossview.kernel"
PACKAGES = ("crossview", KERNEL, *SERVICES)


def _modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name, wherever its folder is."""
    out = {}
    for pkg in PACKAGES:
        root = Path(importlib.import_module(pkg).__file__).parent
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).with_suffix("").parts
            rel = rel[:-1] if rel[-1] == "__init__" else rel
            name = ".".join((pkg, *rel))
            if pkg == "crossview" and len(rel) > 1:
                continue  # crossview/ holds no sub-packages: anything deeper is not ours
            out[name] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Absolute names of everything `name` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
    return found


def _floor(name: str) -> str | None:
    """"kernel", the service's name, "app", or None for the neutral root (`crossview/__init__`: the version)."""
    if name == KERNEL or name.startswith(KERNEL + "."):
        return "kernel"
    for s in SERVICES:
        if name == s or name.startswith(s + "."):
            return s
    if name == "crossview":
        return None
    return "app" if name.startswith("crossview.") else "outside"


def _allowed(here: str | None, there: str | None) -> bool:
    if here == "app" or there == "outside":
        return True
    if here is None:
        return there is None
    return there in (None, "kernel", here)


def _violations() -> list[str]:
    return sorted(f"{name} ({_floor(name) or 'root'}) imports {target} ({_floor(target)})"
                  for name, path in _modules().items() for target in _imports(name, path)
                  if not _allowed(_floor(name), _floor(target)))


def test_services_import_only_the_kernel_and_the_kernel_imports_no_service():
    modules = _modules()
    assert {"crossview.cli", "crossview.kernel.wire", "crossview.edge.node", "crossview.matcher.service",
            "crossview.trainer.engine"} <= modules.keys()
    assert _violations() == []


def test_the_import_check_catches_a_service_importing_another(tmp_path, monkeypatch):
    """The check itself: a matcher module that imports the edge, and a kernel module that imports the trainer."""
    fake = {"crossview.matcher.fake": tmp_path / "fake.py", "crossview.kernel.fake2": tmp_path / "fake2.py"}
    fake["crossview.matcher.fake"].write_text("def f():\n    from crossview.edge.node import EdgeNode\n")
    fake["crossview.kernel.fake2"].write_text("from ..trainer import engine\n")
    monkeypatch.setattr(sys.modules[__name__], "_modules", lambda: fake)
    assert _violations() == [
        "crossview.kernel.fake2 (kernel) imports crossview.trainer (crossview.trainer)",
        "crossview.matcher.fake (crossview.matcher) imports crossview.edge.node (crossview.edge)",
    ]


def test_no_generic_top_level_packages_are_importable(tmp_path):
    """From outside the checkout, `import edge` must fail and `import crossview.edge` work (editable install)."""
    code = ("import importlib.util as u, crossview.edge, crossview.kernel, crossview.matcher, crossview.trainer\n"
            "print([n for n in ('edge', 'matcher', 'trainer', 'kernel') if u.find_spec(n) is not None])")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.timeout(300)
def test_the_wheel_installs_one_crossview_package(tmp_path):
    """Build the wheel, install it into a fresh venv: every folder is under crossview/, nothing generic beside it."""
    src = tmp_path / "src"  # a copy: setuptools writes build/ and *.egg-info into the tree it builds
    listed = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    files = subprocess.run(listed, cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=240)
    wheel = next((tmp_path / "dist").glob("crossview-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"crossview"}
    every_module = {name.replace(".", "/") + ("/__init__.py" if path.name == "__init__.py" else ".py")
                    for name, path in _modules().items()}
    assert every_module - set(names) == set()  # a sub-package missing from pyproject's list shows here
    assert "crossview/matcher/web/index.html" in names
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True, timeout=120)
    code = ("import importlib.util as u, crossview\n"
            "print(u.find_spec('crossview.edge.node').origin.startswith(crossview.__path__[0]),"
            " [n for n in ('edge', 'matcher', 'trainer', 'kernel') if u.find_spec(n) is not None])")
    out = subprocess.run([str(py), "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True []"


def _with_examples() -> list[str]:
    return sorted(n for n, p in _modules().items() if ">>>" in p.read_text())


@pytest.mark.parametrize("name", _with_examples())
def test_docstring_examples_run(name):
    """A `>>>` example in a docstring is a doctest: it must run and print what it says."""
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
