"""A GGUF file as the source (`quantize model-F16.gguf q4`), as llama-quantize takes one.

Metadata is copied; general.file_type and general.quantization_version are set anew. A
tensor that keeps its type is copied byte for byte; others are dequantized to float32 and
quantized again. Requantizing a tensor that is already quantized loses quality twice, so
it needs `allow_requantize` (llama-quantize's --allow-requantize).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ggforge.convert.mixes import FileType, MixOptions
from ggforge.convert.plan import ConversionPlan, PlannedTensor, assign_types, file_type_kvs, merge_kvs
from ggforge.formats.errors import FormatError, QuantizationError
from ggforge.formats.gguf_reader import GGUFFile
from ggforge.formats.gguf_writer import KV
from ggforge.formats.quants import dequantize, get_type

_FLOATS = ("F32", "F16", "BF16")


def _kv(g: GGUFFile, key: str) -> KV:
    vtype, elem = g.value_types[key]
    value = g.metadata[key]
    if isinstance(value, np.ndarray):
        value = value.tolist()
    return KV(key, vtype, value, elem)


def plan_requantization(path: Path, file_type: FileType, overrides: list[KV],
                        options: MixOptions | None) -> ConversionPlan:
    g = GGUFFile.open(path)
    try:
        return _plan(g, path, file_type, overrides, options,
                     options is not None and options.allow_requantize)
    except BaseException:
        g.close()
        raise


def _plan(g: GGUFFile, path: Path, file_type: FileType, overrides: list[KV],
          options: MixOptions | None, allow_requantize: bool) -> ConversionPlan:
    arch = g.get("general.architecture")
    if not isinstance(arch, str):
        raise FormatError(f"{path}: no general.architecture; not a model file")
    n_layer = int(g.get(f"{arch}.block_count", 0) or 0)
    n_head = g.get(f"{arch}.attention.head_count", 1)
    n_head_kv = g.get(f"{arch}.attention.head_count_kv", n_head)
    n_gqa = int(np.max(n_head)) // max(int(np.max(n_head_kv)), 1)

    def read(t: PlannedTensor) -> np.ndarray:
        info = g.tensors[t.source]
        return dequantize(np.asarray(g.raw(t.source)), get_type(info.ggml_type), info.shape)

    def read_raw(t: PlannedTensor) -> np.ndarray:
        return g.raw(t.source)

    name = path.stem
    plan = ConversionPlan([path], path.parent, name, file_type, read=read, read_raw=read_raw,
                          close=g.close)
    for info in g.tensors.values():
        src_type = get_type(info.ggml_type).name
        plan.tensors.append(PlannedTensor(info.name, info.name, info.shape, source_type=src_type))
    assign_types(plan, n_layer=n_layer, n_gqa=n_gqa, is_70b=arch == "llama" and n_layer == 80,
                 options=options)
    for t in plan.tensors:
        if t.source_type not in _FLOATS and t.qtype.name != t.source_type and not allow_requantize:
            raise QuantizationError(
                f"{path}: tensor {t.name!r} is already quantized ({t.source_type}); requantizing it "
                f"to {t.qtype.name} adds a second rounding error on top of the first, so the result "
                "is worse than quantizing the original weights. Start from an F32/F16/BF16 file, or "
                "pass --allow-requantize to do it anyway")
    kvs = [_kv(g, k) for k in g.metadata if k != "general.alignment"]
    kvs = merge_kvs(kvs, file_type_kvs(file_type))
    plan.metadata = merge_kvs(kvs, overrides)
    return plan
