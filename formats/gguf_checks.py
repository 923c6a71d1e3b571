"""Semantic checks of a parsed GGUF file (RELIABILITY.md, reader item 12).

The reader (gguf_reader.py) guarantees that the bytes are well formed; these checks make
sure the numbers a runtime will index with agree with each other: tokenizer arrays of one
length and the right types, special token ids inside the vocabulary, `{arch}.block_count`
matching the `blk.N.` tensors, and head counts matching the attention weight shapes.
A contradiction here would otherwise surface as an out-of-bounds index deep in a kernel.

    with GGUFFile.open(path) as g:
        check_model_metadata(g)   # FormatError naming the key or tensor
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable

from gguf import GGUFValueType as V

from ggforge.formats.errors import FormatError

_INT_TYPES = {V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64}

TOKENS = "tokenizer.ggml.tokens"
# Per-token arrays: key -> element types accepted (llama.cpp also takes INT32 scores).
_PER_TOKEN = {
    "tokenizer.ggml.scores": {V.FLOAT32, V.INT32},
    "tokenizer.ggml.token_type": {V.INT32},
}
# Arrays with their own length: key -> element types accepted.
_OTHER_ARRAYS = {TOKENS: {V.STRING}, "tokenizer.ggml.merges": {V.STRING}}
# bos/eos/eot/eom/unknown/seperator (sic)/padding/cls/mask/fim_*/prefix/suffix/middle ...
_SPECIAL_ID = re.compile(r"^tokenizer\.ggml\.\w+_token_id$")
# Tensors with one row per token: a token id indexes them.
_VOCAB_ROWS = ("token_embd.weight", "output.weight")

_LAYER = re.compile(r"^blk\.(\d+)\.")
# Keys a runtime reads as names, flags, integers and floats (llama.cpp's names; `{arch}.`
# goes in front of the last two kinds). Three integers may also come one per layer. A RoPE
# base or scale of 0 or below, like a NaN anywhere, turns every logit into NaN.
_STRING_KEYS = ("general.name", "tokenizer.ggml.model", "tokenizer.ggml.pre",
                "tokenizer.chat_template")
_BOOL_KEYS = ("tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token",
              "tokenizer.ggml.add_space_prefix")
_ARCH_INT_KEYS = ("context_length", "embedding_length", "feed_forward_length", "block_count",
                  "attention.head_count", "attention.head_count_kv", "attention.key_length",
                  "attention.value_length", "rope.dimension_count", "attention.sliding_window",
                  "vocab_size", "expert_count", "expert_used_count")
_PER_LAYER_KEYS = {"feed_forward_length", "attention.head_count", "attention.head_count_kv"}
_ARCH_FLOAT_KEYS = ("attention.layer_norm_epsilon", "attention.layer_norm_rms_epsilon",
                    "rope.freq_base", "rope.freq_base_swa", "rope.scaling.factor",
                    "final_logit_softcapping", "attn_logit_softcapping")
_POSITIVE_KEYS = {"rope.freq_base", "rope.freq_base_swa", "rope.scaling.factor"}
# Architectures whose attn_q also carries a per-head output gate: 2 x head_count x head_dim
# rows (llama.cpp src/models/qwen3next.cpp, qwen35.cpp, qwen35moe.cpp, qwen4exp.cpp).
_GATED_Q = {"qwen3next", "qwen35", "qwen35moe", "qwen4exp"}
# Head sizes an architecture may state; any of them may size a layer's attention
# (sliding-window and MLA layers have their own).
_KEY_LENGTHS = ("attention.key_length", "attention.key_length_swa", "attention.key_length_mla")
_VALUE_LENGTHS = ("attention.value_length", "attention.value_length_swa",
                  "attention.value_length_mla")


def check_model_metadata(g: Any) -> None:
    """Raise FormatError if the metadata of the GGUFFile `g` contradicts itself or its
    tensors. Checks only what is present: a vocab-only file or one without an
    architecture passes the checks that need what it lacks."""
    n_vocab = _check_tokenizer(g)
    arch = g.metadata.get("general.architecture")
    if "general.architecture" in g.metadata and not isinstance(arch, str):
        raise _err(g, "key 'general.architecture' must be a string")
    _check_value_types(g, arch)
    layers = _check_block_count(g, arch) if arch else None
    if arch and layers is not None:
        _check_heads(g, arch, layers)
    if n_vocab is not None:
        for name in _VOCAB_ROWS:
            t = g.tensors.get(name)
            if t is not None and len(t.dims) >= 2 and t.dims[1] != n_vocab:
                raise _err(g, f"tensor {name!r} has {t.dims[1]} rows but {TOKENS!r} has "
                              f"{n_vocab} tokens")


def _check_value_types(g: Any, arch: str | None) -> None:
    """The keys a runtime reads as numbers or names have a number's or a name's type (a
    string array where a length belongs would surface as a TypeError deep in a loader)."""
    for keys, vtype in ((_STRING_KEYS, V.STRING), (_BOOL_KEYS, V.BOOL)):
        for key in keys:
            if key in g.metadata and g.value_types[key][0] != vtype:
                raise _err(g, f"key {key!r} must be a {vtype.name}, not "
                              f"{g.value_types[key][0].name}")
    if not arch:
        return
    for name in _ARCH_INT_KEYS:
        key = f"{arch}.{name}"
        if key not in g.metadata:
            continue
        vtype, elem = g.value_types[key]
        if vtype not in _INT_TYPES and not (name in _PER_LAYER_KEYS and elem in _INT_TYPES):
            got = vtype.name if elem is None else f"ARRAY of {elem.name}"
            raise _err(g, f"key {key!r} must be an integer"
                          f"{' (or one per layer)' if name in _PER_LAYER_KEYS else ''}, not {got}")
    for name in _ARCH_FLOAT_KEYS:
        key = f"{arch}.{name}"
        if key not in g.metadata:
            continue
        vtype, elem = g.value_types[key]
        if vtype not in _INT_TYPES | {V.FLOAT32, V.FLOAT64}:
            got = vtype.name if elem is None else f"ARRAY of {elem.name}"
            raise _err(g, f"key {key!r} must be a number, not {got}")
        value = g.metadata[key]
        if not math.isfinite(value):
            raise _err(g, f"key {key!r} is {value}, not a finite number")
        if name in _POSITIVE_KEYS and value <= 0:
            raise _err(g, f"key {key!r} is {value}; it must be greater than 0")


def _err(g: Any, what: str) -> FormatError:
    return FormatError(f"{g.path}: {what}")


def _int(g: Any, key: str, default: Any = None) -> Any:
    """An integer scalar value, or `default` when absent; FormatError for another type."""
    if key not in g.metadata:
        return default
    vtype, _ = g.value_types[key]
    if vtype not in _INT_TYPES:
        raise _err(g, f"key {key!r} must be an integer, not {vtype.name}")
    return int(g.metadata[key])


def _per_layer(g: Any, key: str, n_layers: int,
               default: Callable[[int], int] | None) -> Callable[[int], int] | None:
    """A value given once for all layers or as an array with one entry per layer, as a
    function of the layer index. (Not a list: n_layers comes from the file and may be
    2**63, while an array's length is bounded by the file's bytes.)"""
    if key not in g.metadata:
        return default
    vtype, elem = g.value_types[key]
    if vtype == V.ARRAY:
        if elem not in _INT_TYPES:
            raise _err(g, f"key {key!r} must be an integer array, not {elem.name}")
        values = [int(v) for v in g.metadata[key]]
        if len(values) != n_layers:
            raise _err(g, f"key {key!r} has {len(values)} entries for {n_layers} layers")
        return values.__getitem__
    value = _int(g, key)
    return lambda i: value


def _check_tokenizer(g: Any) -> int | None:
    """Types and lengths of the tokenizer arrays; special ids in range. Returns n_vocab."""
    for key, elems in {**_OTHER_ARRAYS, **_PER_TOKEN}.items():
        if key not in g.metadata:
            continue
        vtype, elem = g.value_types[key]
        if vtype != V.ARRAY or elem not in elems:
            got = vtype.name if vtype != V.ARRAY else f"ARRAY of {elem.name}"
            want = " or ".join(sorted(e.name for e in elems))
            raise _err(g, f"key {key!r} must be an ARRAY of {want}, not {got}")
    if TOKENS not in g.metadata:
        for key in _PER_TOKEN:
            if key in g.metadata:
                raise _err(g, f"key {key!r} is present but {TOKENS!r} is missing")
        return None
    n_vocab = len(g.metadata[TOKENS])
    for key in _PER_TOKEN:
        if key in g.metadata and len(g.metadata[key]) != n_vocab:
            raise _err(g, f"key {key!r} has {len(g.metadata[key])} entries but {TOKENS!r} "
                          f"has {n_vocab}")
    for key in g.metadata:
        if _SPECIAL_ID.match(key):
            token = _int(g, key)
            if not 0 <= token < n_vocab:
                raise _err(g, f"special token id {key!r} = {token} is outside the vocabulary "
                              f"of {n_vocab} tokens")
    return n_vocab


def _check_block_count(g: Any, arch: str) -> int | None:
    """`{arch}.block_count` against the `blk.N.` tensor names. Returns the layer count."""
    key = f"{arch}.block_count"
    n_layers = _int(g, key)
    if n_layers is not None and n_layers < 0:
        raise _err(g, f"key {key!r} is negative ({n_layers})")
    found = {int(m.group(1)) for name in g.tensors if (m := _LAYER.match(name))}
    if n_layers is None or not found:
        return n_layers  # no layers to compare (vocab-only file, or no block_count)
    if max(found) >= n_layers:
        raise _err(g, f"tensor blk.{max(found)}.* contradicts {key!r} = {n_layers}")
    if len(found) != n_layers:
        # the smallest missing layer, found in len(found) steps: n_layers comes from the
        # file and may be 2**63, so never build range(n_layers)
        missing = next(i for i in range(len(found) + 1) if i not in found)
        raise _err(g, f"key {key!r} = {n_layers} but there are no blk.{missing}.* tensors "
                      f"({len(found)} layers have tensors)")
    return n_layers


def _head_sizes(g: Any, arch: str, keys: tuple[str, ...], n_embd: int | None,
                n_head: int) -> set[int]:
    """Per-head sizes the metadata allows: the explicit lengths, else n_embd / n_head
    (llama.cpp's default); empty when neither is known."""
    sizes = {v for k in keys if (v := _int(g, f"{arch}.{k}")) is not None}
    if not sizes and n_embd is not None and n_embd % n_head == 0:
        sizes = {n_embd // n_head}
    return sizes


def _check_heads(g: Any, arch: str, n_layers: int) -> None:
    """head_count / head_count_kv x head size against attn_q / attn_k / attn_v rows."""
    kh, kkv = f"{arch}.attention.head_count", f"{arch}.attention.head_count_kv"
    heads = _per_layer(g, kh, n_layers, None)
    if heads is None:
        return
    heads_kv = _per_layer(g, kkv, n_layers, heads)
    n_embd = _int(g, f"{arch}.embedding_length")
    n_rot = _int(g, f"{arch}.rope.dimension_count")
    q_factor = 2 if arch in _GATED_Q else 1
    # Only layers that have tensors (all < n_layers, see _check_block_count): looping
    # over range(n_layers) would let the file's block_count decide how long we loop.
    layers = sorted({int(m.group(1)) for name in g.tensors if (m := _LAYER.match(name))})
    for i in layers:
        q, k, v = (g.tensors.get(f"blk.{i}.attn_{x}.weight") for x in "qkv")
        if q is None and k is None and v is None:
            continue  # recurrent / fused-qkv / MLA layer: nothing to compare here
        n_head, n_kv = heads(i), heads_kv(i)
        if n_head <= 0 or n_kv <= 0:
            raise _err(g, f"layer {i} has attention weights but {kh} = {n_head} and "
                          f"{kkv} = {n_kv}")
        if n_head % n_kv:
            raise _err(g, f"layer {i}: {kh} = {n_head} is not a multiple of {kkv} = {n_kv}")
        dk = _head_sizes(g, arch, _KEY_LENGTHS, n_embd, n_head)
        dv = _head_sizes(g, arch, _VALUE_LENGTHS, n_embd, n_head) or dk
        if not dk and n_embd is not None:
            raise _err(g, f"layer {i}: {arch}.embedding_length {n_embd} is not divisible by "
                          f"{kh} = {n_head} and no {arch}.attention.key_length is given")
        # RoPE turns pairs of a head's dimensions: more than the head has would write
        # past each head (a heap overflow in an unchecked kernel)
        if n_rot is not None and dk and (n_rot <= 0 or n_rot % 2 or n_rot > max(dk)):
            raise _err(g, f"key '{arch}.rope.dimension_count' = {n_rot} contradicts the head "
                          f"size {max(dk)} of layer {i}: RoPE rotates an even number of "
                          f"dimensions, from 2 to the head size")
        for t, n, sizes, what in ((q, n_head * q_factor, dk, kh), (k, n_kv, dk, kkv),
                                  (v, n_kv, dv, kkv)):
            if t is None or not sizes or len(t.dims) < 2:
                continue
            if t.dims[1] not in {n * s for s in sizes}:
                raise _err(g, f"tensor {t.name!r} has {t.dims[1]} rows, which contradicts "
                              f"{what} = {n} heads of size {sorted(sizes)}")
