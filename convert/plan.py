"""Plan a conversion: which tensors, under which GGUF names, in which types, with what metadata.

Planning reads only headers and small json files, so a whole plan (and the output size) is
known before a single weight is read.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np
from gguf import GGUFValueType as V

from ggforge.convert.archs import ArchSpec, HParams, spec_for_config
from ggforge.convert.archs.base import SKIP_MARKERS, SKIP_SUFFIXES
from ggforge.convert.mixes import FileType, Mixer, MixOptions, llama_order
from ggforge.convert.rows import RowSource
from ggforge.convert.tokenizer import export_tokenizer
from ggforge.formats.checkpoint import Checkpoint
from ggforge.formats.errors import FormatError, UnsupportedModelError
from ggforge.formats.gguf_writer import KV
from ggforge.formats.quants import QuantType, get_type

_CONVERTIBLE_DTYPES = ("F32", "F16", "BF16")


@dataclass
class PlannedTensor:
    """One output tensor: where it comes from and what it becomes."""

    name: str                        # GGUF name, e.g. "blk.0.attn_q.weight"
    source: str | None               # name in the source; None for generated tensors
    shape: tuple[int, ...]           # numpy order
    qtype: QuantType | None = None   # set once all tensors are known (mixes count them)
    generated: np.ndarray | None = None
    source_type: str = "F32"         # what a tensor that is not quantized keeps
    rows: int | None = None          # keep only the first `rows` rows of the source

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class ConversionPlan:
    """What will be written, and how to read each tensor from the source."""

    inputs: list[Path]               # files the output must not overwrite
    model_dir: Path                  # default output folder
    model_name: str
    file_type: FileType
    read: Callable[[PlannedTensor], np.ndarray]          # float32, shape t.shape
    read_raw: Callable[[PlannedTensor], np.ndarray] | None = None  # bytes as stored (copies)
    # where a tensor's rows can be read a chunk at a time (the fast path); None: use read
    row_source: Callable[[PlannedTensor], RowSource | None] | None = None
    close: Callable[[], None] = lambda: None
    tensors: list[PlannedTensor] = field(default_factory=list)
    metadata: list[KV] = field(default_factory=list)

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)


def load_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise FormatError(f"{path}: missing; the model folder needs its config.json")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise FormatError(f"{path}: expected a JSON object")
    return config


def _gguf_name(spec: ArchSpec, name_map: gguf.TensorNameMap, hf_name: str) -> str | None:
    """GGUF name of an HF tensor, None when llama.cpp's converter drops it."""
    if hf_name.endswith(SKIP_SUFFIXES) or any(m in hf_name for m in SKIP_MARKERS) or hf_name in spec.skip:
        return None
    name = hf_name.replace("language_model.", "")  # text model inside a multimodal checkpoint
    new = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
    if new is None:
        raise UnsupportedModelError(f"tensor {hf_name!r}: no {spec.name} GGUF name for it; "
                                    "is the checkpoint of the architecture its config.json names?")
    return new


def plan_conversion(source: str | Path, file_type: FileType, overrides: list[KV] | None = None,
                    options: MixOptions | None = None) -> ConversionPlan:
    """Everything about a conversion except the weights themselves."""
    if Path(source).is_file() and Path(source).suffix == ".gguf":
        from ggforge.convert.gguf_source import plan_requantization

        return plan_requantization(Path(source), file_type, overrides or [], options)
    ckpt = Checkpoint.open(source)
    try:
        return _plan_hf(ckpt, file_type, overrides or [], options)
    except BaseException:
        ckpt.close()
        raise


def _plan_hf(ckpt: Checkpoint, file_type: FileType, overrides: list[KV],
             options: MixOptions | None) -> ConversionPlan:
    config = load_config(ckpt.model_dir)
    spec = spec_for_config(config, str(ckpt.model_dir / "config.json"))
    hp = HParams.from_config(config, str(ckpt.model_dir / "config.json"))
    n_blocks = int(hp.need("num_hidden_layers", "n_layer"))
    name_map = spec.name_map(n_blocks)

    def read(t: PlannedTensor) -> np.ndarray:
        if t.generated is not None:
            return t.generated
        data = ckpt.read_float32(t.source)
        if t.rows is not None:
            data = data[: t.rows]
        return spec.transform(t.source, data, hp)

    def row_source(t: PlannedTensor) -> RowSource | None:
        entry = ckpt.tensors.get(t.source) if t.generated is None and t.source else None
        if entry is None or len(entry.shape) != 2 or not RowSource.supports(entry.dtype):
            return None
        n_rows = entry.shape[0] if t.rows is None else t.rows
        order = row_order(lambda d: spec.transform(t.source, d, hp), n_rows)
        if order is False:
            return None
        return RowSource(t.source, entry.path, entry.offset, entry.dtype, n_rows, entry.shape[1],
                         order)

    plan = ConversionPlan(list(ckpt.files), ckpt.model_dir, ckpt.model_dir.resolve().name,
                          file_type, read=read, close=ckpt.close, row_source=row_source)

    for gname, data in spec.extra_tensors(hp):
        plan.tensors.append(PlannedTensor(gname, None, data.shape, generated=data))
    seen: dict[str, str] = {}
    for hf_name, entry in ckpt.tensors.items():
        gname = _gguf_name(spec, name_map, hf_name)
        if gname is None:
            continue
        if entry.dtype not in _CONVERTIBLE_DTYPES:
            raise UnsupportedModelError(f"tensor {hf_name!r} has dtype {entry.dtype}; "
                                        f"supported: {', '.join(_CONVERTIBLE_DTYPES)}")
        if gname in seen:
            raise UnsupportedModelError(f"tensors {seen[gname]!r} and {hf_name!r} both map to {gname!r}")
        seen[gname] = hf_name
        shape = tuple(entry.shape)
        plan.tensors.append(PlannedTensor(gname, hf_name, shape))
    if not any(t.name == "token_embd.weight" for t in plan.tensors):
        raise UnsupportedModelError(f"{ckpt.model_dir}: no token embedding tensor found")
    tokenizer_kvs = export_tokenizer(ckpt.model_dir, spec.name)
    if spec.trim_embd_to_vocab:
        n_vocab = next(len(kv.value) for kv in tokenizer_kvs if kv.key == gguf.Keys.Tokenizer.LIST)
        for t in plan.tensors:
            if t.name == "token_embd.weight" and t.shape[0] > n_vocab:
                t.rows, t.shape = n_vocab, (n_vocab, *t.shape[1:])
    assign_types(plan, n_layer=n_blocks, n_gqa=hp.n_head // hp.n_head_kv,
                 is_70b=spec.name == "llama" and n_blocks == 80,  # llama.cpp's LLM_TYPE_70B
                 options=options)
    kvs = [KV(gguf.Keys.General.ARCHITECTURE, V.STRING, spec.name),
           KV(gguf.Keys.General.TYPE, V.STRING, "model"),
           KV(gguf.Keys.General.NAME, V.STRING, plan.model_name),
           KV(gguf.Keys.General.SIZE_LABEL, V.STRING, gguf.size_label(plan.n_params, 0, 0, 0))]
    kvs += spec.hparam_kvs(hp)
    kvs += file_type_kvs(file_type)
    kvs += tokenizer_kvs
    plan.metadata = merge_kvs(kvs, overrides)
    return plan


def row_order(transform: Callable[[np.ndarray], np.ndarray], n_rows: int) -> np.ndarray | None | bool:
    """How ``transform`` moves the rows of an (n_rows, ...) tensor: None when it leaves
    them as they are, the source row of each output row when it only reorders them, and
    False when it does anything else (changes values, shapes or columns).

    Found by transforming a probe whose rows hold their own index (and the index + 0.25
    in a second column, so that a change of columns or values shows), which keeps the
    architecture's transforms in one place (ArchSpec.transform) for both read paths.
    """
    idx = np.arange(n_rows, dtype=np.float64)
    probe = np.stack([idx, idx + 0.25], axis=1)  # (n_rows, 2)
    out = np.asarray(transform(probe))
    if out.shape != probe.shape or not np.array_equal(out[:, 1], out[:, 0] + 0.25):
        return False
    order = out[:, 0].astype(np.int64)
    if not np.array_equal(order, out[:, 0]) or not np.array_equal(np.sort(order), idx):
        return False
    return None if np.array_equal(order, idx) else order


def assign_types(plan: ConversionPlan, *, n_layer: int, n_gqa: int, is_70b: bool,
                 options: MixOptions | None) -> None:
    """Give every planned tensor its type, in llama.cpp's order (the mixes count layers)."""
    plan.tensors.sort(key=lambda t: llama_order(t.name))
    mixer = Mixer(plan.file_type, [t.name for t in plan.tensors], n_layer=n_layer,
                  n_gqa=n_gqa, is_70b=is_70b, options=options)
    for t in plan.tensors:
        t.qtype = get_type(mixer.tensor_type(t.name, t.shape, t.source_type))


def file_type_kvs(file_type: FileType) -> list[KV]:
    G = gguf.Keys.General
    return [KV(G.FILE_TYPE, V.UINT32, int(file_type.ftype)),
            KV(G.QUANTIZATION_VERSION, V.UINT32, gguf.GGML_QUANT_VERSION)]


def merge_kvs(kvs: list[KV], overrides: list[KV]) -> list[KV]:
    """Later entries win; each key keeps its first position."""
    merged: dict[str, KV] = {}
    for kv in kvs + overrides:
        merged[kv.key] = kv
    return list(merged.values())
