"""Regenerate the Python stubs for the `.proto` files in this folder (`make protos`).

Two rewrites follow protoc, both so the stubs can live inside the `hybridroute.protos`
package and next to other OIP implementations in one process:

* the `_pb2_grpc` modules import their messages relatively;
* the messages are registered in a private descriptor pool. Every OIP implementation
  (tritonclient, the KServe SDK, MLServer) declares `package inference;`, and the
  default pool refuses a second file defining `inference.ModelInferRequest`, so an
  application that imports tritonclient and hybridroute together would crash at import.
  The wire format does not depend on the pool.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
POOL_LINE = "_POOL = _descriptor_pool.DescriptorPool()  # private: see protos/generate.py\n"


def generate() -> list[Path]:
    from grpc_tools import protoc  # dev extra; imported lazily so the package never needs it

    protos = sorted(HERE.glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{HERE}",
        f"-I{include}",
        f"--python_out={HERE}",
        f"--pyi_out={HERE}",
        f"--grpc_python_out={HERE}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the messages above")
    written: list[Path] = []
    for proto in protos:
        stem = proto.stem
        pb2 = HERE / f"{stem}_pb2.py"
        text = pb2.read_text()
        text = text.replace("_descriptor_pool.Default()", "_POOL", 1)
        text = text.replace("_sym_db = _symbol_database.Default()\n", POOL_LINE, 1)
        pb2.write_text(text)
        grpc_mod = HERE / f"{stem}_pb2_grpc.py"
        text = grpc_mod.read_text()
        text = re.sub(
            rf"^import {stem}_pb2 as", f"from . import {stem}_pb2 as", text, flags=re.MULTILINE
        )
        grpc_mod.write_text(text)
        written += [pb2, grpc_mod, HERE / f"{stem}_pb2.pyi"]
    return written


if __name__ == "__main__":
    for path in generate():
        print(f"wrote {path.relative_to(HERE.parent)}", file=sys.stderr)
