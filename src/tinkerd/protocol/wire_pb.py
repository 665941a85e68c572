"""The SDK's generated protobuf module (`tinker.proto.tinker_public_pb2`), imported, never copied.

Loaded straight from the installed SDK's file so that the server does not execute
`tinker/__init__.py` (which pulls in torch and the whole client). If the SDK package is already
imported in this process, its own module object is reused.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_SDK_MODULE = "tinker.proto.tinker_public_pb2"


def _load():
    if _SDK_MODULE in sys.modules:
        return sys.modules[_SDK_MODULE]
    if "tinker" in sys.modules:
        return importlib.import_module(_SDK_MODULE)
    spec = importlib.util.find_spec("tinker")
    if spec is None or spec.origin is None:
        raise ImportError("tinkerd needs the official 'tinker' SDK installed (pip install 'tinker>=0.38')")
    path = Path(spec.origin).parent / "proto" / "tinker_public_pb2.py"
    module_spec = importlib.util.spec_from_file_location(_SDK_MODULE, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[_SDK_MODULE] = module  # the SDK finds it here if it is imported later
    module_spec.loader.exec_module(module)
    return module


pb = _load()
