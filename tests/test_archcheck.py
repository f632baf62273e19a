"""tools/archcheck.py, the import-cycle and function-length check that `make test` runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("archcheck", ROOT / "tools" / "archcheck.py")
assert _spec is not None and _spec.loader is not None
archcheck = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(archcheck)


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in {"pkg/__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_cycles_hidden_in_functions_and_relative_imports_are_found(tmp_path: Path) -> None:
    src = _package(
        tmp_path,
        {
            "pkg/base.py": "def load():\n    from pkg.impl import thing\n    return thing\n",
            "pkg/impl.py": "from .base import load\nthing = 1\n",
            "pkg/sub/__init__.py": "from pkg.sub import leaf\n",  # a package re-exporting its child: no cycle
            "pkg/sub/leaf.py": "from pkg import sub\nfrom ..base import load\n",
            "pkg/_proto/gen.py": "from pkg import base\n",  # generated code is left out
        },
    )
    modules = archcheck.find_modules(src, "pkg")
    assert set(modules) == {"pkg", "pkg.base", "pkg.impl", "pkg.sub", "pkg.sub.leaf"}
    graph = archcheck.import_graph(modules)
    assert graph["pkg.impl"] == {"pkg.base"} and graph["pkg.base"] == {"pkg.impl"}
    assert graph["pkg.sub.leaf"] == {"pkg.base"}
    assert archcheck.import_cycles(graph) == [["pkg.base", "pkg.impl"]]
    assert archcheck.main(["--src", str(src), "--package", "pkg"]) == 1


def test_long_functions_are_found_and_a_clean_package_passes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(60))
    src = _package(tmp_path, {"pkg/a.py": f"def short():\n    return 1\n\n\ndef long():\n{body}"})
    assert archcheck.main(["--src", str(src), "--package", "pkg", "--max-lines", "61"]) == 0
    capsys.readouterr()
    assert archcheck.main(["--src", str(src), "--package", "pkg"]) == 1
    assert "a.py:5 long (61 lines > 60)" in capsys.readouterr().out
    (found,) = archcheck.long_functions(archcheck.find_modules(src, "pkg"), 60)
    assert found[1:] == (5, "long", 61)


def test_gradcomp_has_no_import_cycle_and_no_long_function(capsys: pytest.CaptureFixture) -> None:
    assert archcheck.main(["--src", str(ROOT / "src")]) == 0, capsys.readouterr().out


def _documented_layers() -> dict[str, int]:
    """docs/architecture.md's package table: `pkg/` or `module.py` -> its layer number."""
    layers = {}
    for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].isdigit() and cells[1].startswith("`"):
            name = cells[1].strip("`").removesuffix("/").removesuffix(".py")
            layers[f"gradcomp.{name}"] = int(cells[0])
    return layers


def _package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_architecture_page_lists_every_package_and_imports_run_down_its_layers() -> None:
    layers = _documented_layers()
    modules = archcheck.find_modules(ROOT / "src", "gradcomp")
    packages = {_package_of(m) for m in modules if m != "gradcomp"} | {"gradcomp._proto"}
    assert packages == set(layers), "docs/architecture.md: the package table must name every package, once"
    upward = sorted(
        f"{module} (layer {layers[_package_of(module)]}) imports {target} (layer {layers[_package_of(target)]})"
        for module, targets in archcheck.import_graph(modules).items()
        if module != "gradcomp"
        for target in targets
        if layers[_package_of(target)] > layers[_package_of(module)]
    )
    assert upward == [], "imports that run up the layers of docs/architecture.md:\n" + "\n".join(upward)
