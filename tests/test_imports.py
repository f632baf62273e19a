"""Every module of the package imports on its own, with no other gradcomp module loaded first.

An import that only works after some other module happened to be imported (a hidden order
dependency or an import cycle) fails here. One fresh interpreter pre-loads the third-party
packages our modules import at the top (torch, grpc, ...), then forks one child per module:
each child starts without any gradcomp module and imports just its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

SCRIPT = r"""
import ast, importlib, json, os, sys, traceback
from pathlib import Path

src = Path(sys.argv[1])
names, third_party = [], set()
for path in sorted((src / "gradcomp").rglob("*.py")):
    rel = path.relative_to(src).with_suffix("")
    names.append(".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts))
    for node in ast.parse(path.read_text()).body:  # module-level imports only
        if isinstance(node, ast.Import):
            third_party.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            third_party.add(node.module)
for name in sorted(n for n in third_party if n.split(".")[0] not in ("gradcomp", "__future__")):
    importlib.import_module(name)
assert not [m for m in sys.modules if m.split(".")[0] == "gradcomp"], "pre-loading imported gradcomp"

failures = {}
for name in names:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: import one module, report a traceback through the pipe
        os.close(read)
        try:
            importlib.import_module(name)
            code = 0
        except BaseException:
            os.write(write, traceback.format_exc().encode())
            code = 1
        os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        message = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    if status:
        failures[name] = message or f"exit status {status}"
print(json.dumps({"modules": names, "failures": failures}))
"""


def _import_each(src: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "MPLBACKEND": "Agg"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(src)], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.splitlines()[-1])


def test_every_module_imports_in_isolation() -> None:
    result = _import_each(SRC)
    expected = {p for p in SRC.joinpath("gradcomp").rglob("*.py")}
    assert len(result["modules"]) == len(expected) > 50
    assert {"gradcomp.cli", "gradcomp.tasks.registry", "gradcomp.study.runners"} <= set(result["modules"])
    assert result["failures"] == {}, "\n\n".join(f"{m}:\n{tb}" for m, tb in result["failures"].items())


def test_a_module_that_only_imports_after_another_is_caught(tmp_path: Path) -> None:
    """The check itself: a cycle of top-level `from` imports fails whichever side is imported first."""
    pkg = tmp_path / "gradcomp"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from gradcomp.b import B\nA = 1\n")
    (pkg / "b.py").write_text("from gradcomp.a import A\nB = 2\n")
    (pkg / "fine.py").write_text("import json\n")
    result = _import_each(tmp_path)
    assert sorted(result["failures"]) == ["gradcomp.a", "gradcomp.b"]
    assert "partially initialized module" in result["failures"]["gradcomp.a"]
