"""The wire API of Louver: code generated from ``proto/louver/v1/louver.proto`` plus the codec.

The generated modules are produced from the .proto on first import (with grpcio-tools) into
``louver_proto/_gen`` and regenerated whenever the .proto changes; they are never edited or
committed. Import them as ``from louver_proto import pb, pb_grpc``.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import tempfile
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

_HERE = Path(__file__).resolve().parent
_PROTO_CANDIDATES = (
    _HERE / "louver" / "v1" / "louver.proto",
    _HERE.parent / "proto" / "louver" / "v1" / "louver.proto",
)
_GEN = _HERE / "_gen"


def proto_path() -> Path:
    """The .proto file this package was generated from."""
    for path in _PROTO_CANDIDATES:
        if path.is_file():
            return path
    raise FileNotFoundError(f"louver.proto not found in {[str(p) for p in _PROTO_CANDIDATES]}")


def _generate(proto: Path, digest: str) -> None:
    from grpc_tools import protoc  # build-time dependency; only needed when code is stale

    _GEN.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="_gen.", dir=_HERE))
    include = str(Path(protoc.__file__).parent / "_proto")
    rc = protoc.main(["protoc", f"-I{proto.parent}", f"-I{include}", f"--python_out={tmp}",
                      f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", str(proto)])
    if rc != 0:
        raise RuntimeError(f"protoc failed on {proto} (exit {rc})")
    grpc_file = tmp / "louver_pb2_grpc.py"
    text = grpc_file.read_text()
    grpc_file.write_text(text.replace("import louver_pb2 as", "from . import louver_pb2 as"))
    (tmp / "__init__.py").write_text("")
    (tmp / "DIGEST").write_text(digest)
    try:
        os.replace(tmp, _GEN)  # atomic when _GEN does not exist
    except OSError:
        # another process generated it first, or an old version is there: swap it out.
        old = Path(tempfile.mkdtemp(prefix="_old.", dir=_HERE))
        try:
            os.replace(_GEN, old / "gen")
        except OSError:
            pass
        try:
            os.replace(tmp, _GEN)
        except OSError:
            pass  # a concurrent process won; its output is from the same .proto
        import shutil

        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


def _load() -> tuple[ModuleType, ModuleType]:
    proto = proto_path()
    digest = hashlib.sha256(proto.read_bytes()).hexdigest()
    stamp = _GEN / "DIGEST"
    if not stamp.is_file() or stamp.read_text() != digest:
        _generate(proto, digest)
    return (importlib.import_module(f"{__name__}._gen.louver_pb2"),
            importlib.import_module(f"{__name__}._gen.louver_pb2_grpc"))


if TYPE_CHECKING:  # type checkers read the generated stubs (generated on first import)
    from louver_proto._gen import louver_pb2 as pb
    from louver_proto._gen import louver_pb2_grpc as pb_grpc
else:
    pb, pb_grpc = _load()

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["Louver"].full_name

__all__ = ["pb", "pb_grpc", "proto_path", "SERVICE_NAME"]
