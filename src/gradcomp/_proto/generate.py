"""Regenerate the committed protobuf / gRPC stubs from proto/gradcomp/v1/*.proto.

`python -m gradcomp._proto.generate` (what `make proto` runs) writes them into this package;
`generate()` returns the files without writing, so a test can check the committed stubs.
Imports between generated modules are rewritten to be package-relative, so the stubs work
as `gradcomp._proto.*` without putting anything on sys.path.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROTO_ROOT = PACKAGE_DIR.parents[2] / "proto"
PROTO_PACKAGE = "gradcomp/v1"


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    files = sorted((root / PROTO_PACKAGE).glob("*.proto"))
    if not files:
        raise FileNotFoundError(f"no .proto files under {root / PROTO_PACKAGE}")
    return files


def _fix_imports(text: str) -> str:
    # `from gradcomp.v1 import fed_pb2 as ...` -> `from . import fed_pb2 as ...`
    return re.sub(r"^from gradcomp\.v1 import ", "from . import ", text, flags=re.M)


def generate(root: Path = PROTO_ROOT) -> dict[str, str]:
    """Run protoc (grpc_tools) and return {file name: text} of the package-relative stubs."""
    try:
        from grpc_tools import protoc
    except ImportError as err:  # pragma: no cover - dev dependency
        raise RuntimeError("grpcio-tools is needed to generate stubs: pip install -e '.[dev]'") from err
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{root}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *[str(p.relative_to(root)) for p in proto_files(root)],
        ]
        rc = protoc.main(args)
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc}: {' '.join(args)}")
        out = {}
        for path in sorted((Path(tmp) / PROTO_PACKAGE).iterdir()):
            if path.suffix in (".py", ".pyi"):
                out[path.name] = _fix_imports(path.read_text())
    return out


def main() -> int:
    files = generate()
    for name, text in files.items():
        (PACKAGE_DIR / name).write_text(text)
        print(f"wrote {PACKAGE_DIR / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
