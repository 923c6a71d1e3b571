"""Fuzzing the readers of untrusted model files (RELIABILITY.md): GGUF, safetensors, shard
indexes, and `ggforge inspect`.

A seeded mutator takes valid files and breaks them the ways a hostile or damaged download
is broken: bit flips, truncation, huge counts and lengths, offsets past the end, unaligned
or overlapping, duplicate names, spliced bytes, metadata values of the wrong type or size,
JSON fields of the wrong kind. Every case must end, in under a second and without
allocating what the file's numbers ask for, in one of two ways:

- accepted: every invariant the reader promises holds (checked here independently of the
  reader) and every tensor can be read;
- rejected with a FormatError that names the file; `ggforge inspect` then prints one
  `error:` line and exits 1.

Mutations with a known answer (a duplicate name, a truncated data section, a flipped data
byte, a file our own writer made) are held to it. Cases are reproducible one by one: a
failure names the case and keeps its bytes under the test's tmp_path.

    python -m pytest -q tests/test_fuzz.py                        # a few hundred cases
    python -m pytest -q tests/test_fuzz.py --fuzz-cases 20000     # the long run
"""
from __future__ import annotations

import json
import random
import resource
import struct
import subprocess
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, GGUFValueType as V
from hypothesis import HealthCheck, given, settings, strategies as st

from ggforge.formats.checkpoint import Checkpoint
from ggforge.formats.errors import FormatError, UnsupportedModelError
from ggforge.formats.gguf_checks import check_model_metadata
from ggforge.formats.gguf_reader import GGUFFile, REMOVED_TYPES
from ggforge.formats.gguf_writer import GGUFWriter
from ggforge.formats.safetensors import DTYPES, MAX_HEADER_BYTES, SafetensorsFile
from ggforge.tools.cli import cli

MAX_SECONDS = 1.0              # per case (RELIABILITY.md: no hang)
MAX_CASE_BYTES = 64 << 20      # traced allocation per case; the inputs are < 1 MiB
MAX_RSS_GROWTH = 256 << 20     # resident set growth over a whole run
SIZES = {V.UINT8: 1, V.INT8: 1, V.BOOL: 1, V.UINT16: 2, V.INT16: 2, V.UINT32: 4, V.INT32: 4,
         V.FLOAT32: 4, V.UINT64: 8, V.INT64: 8, V.FLOAT64: 8}


@pytest.fixture(scope="module")
def n_cases(request) -> int:
    return max(1, request.config.getoption("--fuzz-cases"))


# ---------------------------------------------------------------------------------------
# valid GGUF files from a spec, and where their fields lie


VOCAB = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(ord("a"), ord("a") + 13)]
N_EMBD, N_FF = 32, 256


def model_spec(rng: random.Random) -> tuple[list, list]:
    """(kvs, tensors) of a tiny consistent llama model: kvs (key, vtype, value[, elem]),
    tensors (name, numpy shape, ggml type, bytes)."""
    kvs = [("general.architecture", V.STRING, "llama"), ("general.name", V.STRING, "fuzz"),
           ("llama.block_count", V.UINT32, 2), ("llama.context_length", V.UINT32, 64),
           ("llama.embedding_length", V.UINT32, N_EMBD),
           ("llama.feed_forward_length", V.UINT32, N_FF),
           ("llama.attention.head_count", V.UINT32, 4),
           ("llama.attention.head_count_kv", V.UINT32, 2),
           ("llama.rope.freq_base", V.FLOAT32, 10000.0),
           ("llama.rope.dimension_count", V.UINT32, N_EMBD // 4),
           ("llama.attention.layer_norm_rms_epsilon", V.FLOAT32, 1e-5),
           ("tokenizer.ggml.model", V.STRING, "llama"),
           ("tokenizer.ggml.tokens", V.ARRAY, VOCAB, V.STRING),
           ("tokenizer.ggml.scores", V.ARRAY, [-float(i) for i in range(len(VOCAB))], V.FLOAT32),
           ("tokenizer.ggml.token_type", V.ARRAY, [2, 3, 3] + [1] * 13, V.INT32),
           ("tokenizer.ggml.bos_token_id", V.UINT32, 1),
           ("tokenizer.ggml.eos_token_id", V.UINT32, 2),
           ("tokenizer.ggml.add_bos_token", V.BOOL, True), ("general.size", V.UINT64, 12345),
           ("general.ratio", V.FLOAT64, 0.5), ("general.tags", V.ARRAY, [1, 2, 3], V.INT16)]
    shapes = [("token_embd.weight", (len(VOCAB), N_EMBD), Q.F16),
              ("output_norm.weight", (N_EMBD,), Q.F32),
              ("output.weight", (len(VOCAB), N_EMBD), Q.Q8_0)]
    for i in range(2):
        p = f"blk.{i}."
        shapes += [(p + "attn_norm.weight", (N_EMBD,), Q.F32),
                   (p + "attn_q.weight", (N_EMBD, N_EMBD), Q.Q8_0),
                   (p + "attn_k.weight", (16, N_EMBD), Q.Q8_0),
                   (p + "attn_v.weight", (16, N_EMBD), Q.BF16),
                   (p + "attn_output.weight", (N_EMBD, N_EMBD), Q.Q4_0),
                   (p + "ffn_norm.weight", (N_EMBD,), Q.F32),
                   (p + "ffn_gate.weight", (N_FF, N_EMBD), Q.Q8_0),
                   (p + "ffn_up.weight", (N_FF, N_EMBD), Q.Q5_1),
                   (p + "ffn_down.weight", (N_EMBD, N_FF), Q.Q4_K)]
    shapes.append(("empty.weight", (0, 32), Q.F32))
    return kvs, [(n, s, t, _random_bytes(rng, s, t)) for n, s, t in shapes]


def _nbytes(shape, qtype) -> int:
    block, size = GGML_QUANT_SIZES[Q(qtype)]
    n = 1
    for d in shape:
        n *= d
    return n // block * size


def _random_bytes(rng: random.Random, shape, qtype) -> bytes:
    return rng.randbytes(_nbytes(shape, qtype))


def build_gguf(kvs, tensors, alignment: int = 32) -> bytes:
    import io

    f = io.BytesIO()
    w = GGUFWriter(f, alignment=alignment)
    for key, vtype, value, *elem in kvs:
        w.add_value(key, value, vtype, elem[0] if elem else None)
    for name, shape, qtype, _ in tensors:
        w.add_tensor_info(name, shape, qtype)
    w.write_header()
    for name, _, _, data in tensors:
        w.write_tensor(name, data)
    w.finish()
    return f.getvalue()


@dataclass(frozen=True)
class Field:
    kind: str    # version n_tensors n_kv key_len vtype str_len elem_type arr_len scalar
    pos: int     # name_len n_dims dim ttype offset
    size: int
    owner: str   # the key or tensor it belongs to


@dataclass
class Layout:
    """Where everything is in a valid GGUF file, found without the reader under test."""

    fields: list[Field]
    keys: list[tuple[str, int, int]]     # (key, start, end) of each key's length + bytes
    names: list[tuple[str, int, int]]    # the same for tensor names
    header_end: int
    alignment: int
    tensors: dict[str, tuple[int, int]]  # name -> (absolute offset, nbytes)

    @property
    def data_end(self) -> int:
        return max((o + n for o, n in self.tensors.values()), default=0)


def gguf_layout(data: bytes) -> Layout:
    fields = [Field("version", 4, 4, ""), Field("n_tensors", 8, 8, ""), Field("n_kv", 16, 8, "")]
    n_t, n_kv = struct.unpack_from("<QQ", data, 8)
    pos, keys, names, alignment = 24, [], [], 32

    def u32(kind, owner):
        nonlocal pos
        fields.append(Field(kind, pos, 4, owner))
        pos += 4
        return struct.unpack_from("<I", data, pos - 4)[0]

    def u64(kind, owner):
        nonlocal pos
        fields.append(Field(kind, pos, 8, owner))
        pos += 8
        return struct.unpack_from("<Q", data, pos - 8)[0]

    def string(kind, owner):
        nonlocal pos
        start = pos
        n = u64(kind, owner)
        pos += n
        return data[pos - n:pos].decode(), start

    for _ in range(n_kv):
        key, start = string("key_len", "")
        keys.append((key, start, pos))
        vt = u32("vtype", key)
        if vt == V.STRING:
            string("str_len", key)
        elif vt == V.ARRAY:
            et, n = u32("elem_type", key), u64("arr_len", key)
            for _ in range(n if et == V.STRING else 0):
                string("str_len", key)
            pos += 0 if et == V.STRING else n * SIZES[V(et)]
        else:
            fields.append(Field("scalar", pos, SIZES[V(vt)], key))
            if key == "general.alignment":
                alignment = struct.unpack_from("<I", data, pos)[0]
            pos += SIZES[V(vt)]
    infos = []
    for _ in range(n_t):
        name, start = string("name_len", "")
        names.append((name, start, pos))
        dims = [u64("dim", name) for _ in range(u32("n_dims", name))]
        qtype = u32("ttype", name)
        infos.append((name, dims, qtype, u64("offset", name)))
    base = pos + (-pos) % alignment
    tensors = {n: (base + off, _nbytes(d, t)) for n, d, t, off in infos}
    return Layout(fields, keys, names, pos, alignment, tensors)


# ---------------------------------------------------------------------------------------
# GGUF mutations. Each returns (bytes, what was done, expectation): None (any outcome),
# "accept", "reject", or a fragment the rejection's message must contain.


U64_VALUES = [0, 1, 2, 3, 4, 5, 31, 32, 63, 64, 255, 2**16, 2**31, 2**32 - 1, 2**32, 2**32 + 1,
              2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1]
U32_VALUES = [0, 1, 2, 3, 4, 5, 8, 9, 10, 12, 13, 14, 16, 29, 30, 31, 36, 39, 40, 41, 99, 255,
              2**16, 2**31 - 1, 2**31, 0x03000000, 2**32 - 1]
KNOWN_TYPES = {int(t) for t in GGML_QUANT_SIZES}


def _flip(data: bytearray, rng: random.Random, lo: int, hi: int, n: int) -> None:
    for _ in range(n):
        data[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)


def _expect_field(f: Field, old: int, new: int, lay: Layout, size: int) -> str | None:
    """The answer a changed field must get, where it is certain."""
    rest = size - f.pos - f.size
    if new == old:
        return "open"
    if f.kind == "version":
        return None if new in (2, 3) else "version"
    if new * {"n_tensors": 33, "n_kv": 14}.get(f.kind, 0) > size:
        return "reject"  # the smallest tensor info is 33 bytes, the smallest key/value 14
    if f.kind in ("key_len", "str_len", "name_len") and new > rest:
        return "reject"
    if f.kind == "key_len" and new == 0:
        return "empty key"
    if f.kind == "name_len" and (new == 0 or new >= 64):
        return "tensor name"
    if f.kind in ("vtype", "elem_type") and new > 12:
        return "unknown"
    if f.kind == "elem_type" and new == V.ARRAY:
        return "array of arrays"
    if f.kind == "n_dims" and not 1 <= new <= 4:
        return "dimensions"
    if f.kind == "ttype" and (new in REMOVED_TYPES or new not in KNOWN_TYPES):
        return "type"
    if f.kind == "offset":
        if new % lay.alignment:
            return "alignment"
        start, nbytes = lay.tensors[f.owner]
        if nbytes and start - old + new + nbytes > size:
            return "past the end"
    if f.kind == "scalar" and f.owner == "general.alignment" and (new == 0 or new & (new - 1)):
        return "general.alignment"
    return None


def mutate_field(rng, data, lay):
    # the scalars (layer and head counts, lengths, token ids) feed the semantic checks
    scalars = [f for f in lay.fields if f.kind == "scalar"]
    f = rng.choice(scalars if scalars and rng.random() < 0.4 else lay.fields)
    fmt = "<I" if f.size == 4 else "<Q"
    if f.size not in (4, 8):
        return mutate_flip_header(rng, data, lay)
    old = struct.unpack_from(fmt, data, f.pos)[0]
    top = 2**32 if f.size == 4 else 2**64
    choices = (U32_VALUES if f.size == 4 else U64_VALUES) + [
        len(data), len(data) - f.pos, (old + 1) % top, (old - 1) % top, old * 2 % top,
        old + 16 * rng.randrange(1, 8), rng.randrange(top)]
    new = rng.choice(choices) % top
    out = bytearray(data)
    struct.pack_into(fmt, out, f.pos, new)
    return out, f"{f.kind} of {f.owner!r} at {f.pos}: {old} -> {new}", \
        _expect_field(f, old, new, lay, len(data))


def mutate_flip_header(rng, data, lay):
    out = bytearray(data)
    _flip(out, rng, 0, lay.header_end, rng.randint(1, 8))
    return out, "bit flips in the header", None


def mutate_flip_magic(rng, data, lay):
    out = bytearray(data)
    _flip(out, rng, 0, 4, 1)
    return out, "bit flip in the magic", "magic"


def mutate_flip_data(rng, data, lay):
    live = [(o, n) for o, n in lay.tensors.values() if n]
    out = bytearray(data)
    for _ in range(rng.randint(1, 16)):
        o, n = rng.choice(live)
        out[o + rng.randrange(n)] ^= 1 << rng.randrange(8)
    return out, "bit flips in tensor data", "open"


def mutate_truncate(rng, data, lay):
    cut = rng.choice([rng.randrange(len(data)), rng.randrange(lay.header_end),
                      rng.randrange(max(1, len(data) - 64), len(data))])
    needed = max(lay.header_end, lay.data_end)
    return data[:cut], f"truncated to {cut} bytes", "reject" if cut < needed else None


def mutate_duplicate_name(rng, data, lay):
    """Splice one key's (or tensor name's) string over another's: a duplicate, found as
    soon as the second one is read, whatever the shift does to what follows."""
    spans = lay.names if len(lay.names) > 1 and rng.random() < 0.5 else lay.keys
    (a, a0, a1), (b, b0, b1) = rng.sample(spans, 2)
    out = data[:b0] + data[a0:a1] + data[b1:]
    return out, f"name {b!r} replaced by {a!r}", "duplicate"


def mutate_overlap(rng, data, lay):
    live = [n for n, (o, size) in lay.tensors.items() if size]
    a, b = rng.sample(live, 2)
    f = next(f for f in lay.fields if f.kind == "offset" and f.owner == a)
    out = bytearray(data)
    data_start = lay.header_end + (-lay.header_end) % lay.alignment
    struct.pack_into("<Q", out, f.pos, lay.tensors[b][0] - data_start)
    return out, f"tensor {a!r} moved onto {b!r}", "reject"


def mutate_splice(rng, data, lay):
    out = bytearray(data)
    at = rng.randrange(lay.header_end)
    kind = rng.randrange(3)
    if kind == 0:
        out[at:at] = rng.randbytes(rng.randint(1, 16))
    elif kind == 1:
        del out[at:at + rng.randint(1, 16)]
    else:
        src = rng.randrange(lay.header_end)
        out[at:at] = data[src:src + rng.randint(1, 64)]
    return out, f"splice {kind} at {at}", None


def mutate_append(rng, data, lay):
    return data + rng.randbytes(rng.randint(1, 100)), "bytes appended", None


RESHAPING = {mutate_truncate, mutate_duplicate_name, mutate_splice, mutate_append}
GGUF_MUTATIONS = [(mutate_field, 8), (mutate_flip_header, 4), (mutate_flip_magic, 1),
                  (mutate_flip_data, 1), (mutate_truncate, 3), (mutate_duplicate_name, 2),
                  (mutate_overlap, 1), (mutate_splice, 2), (mutate_append, 1)]


# spec-level mutations: still a well-formed GGUF (our writer made it), hostile metadata

def _random_value(rng: random.Random, integer: bool = False):
    kind = 0 if integer else rng.randrange(6)
    if kind == 0:
        t = rng.choice([V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64])
        bits = SIZES[t] * 8
        signed = t in (V.INT8, V.INT16, V.INT32, V.INT64)
        lo, hi = (-(1 << bits - 1), (1 << bits - 1) - 1) if signed else (0, (1 << bits) - 1)
        return (t, rng.choice([lo, hi, 0, 1, 2, 3, 16, 17, lo // 2, hi // 2, rng.randint(lo, hi)]))
    if kind == 1:
        return (rng.choice([V.FLOAT32, V.FLOAT64]),
                rng.choice([0.0, -0.0, float("nan"), float("inf"), -1.0, 1e30, 3.5]))
    if kind == 2:
        return (V.STRING, rng.choice(["", "x" * rng.randint(1, 300), "llama", "gpt2", "é🦙"]))
    if kind == 3:
        return (V.BOOL, rng.random() < 0.5)
    if kind == 4:
        return (V.ARRAY, [rng.choice(VOCAB) for _ in range(rng.randint(0, 40))], V.STRING)
    t = rng.choice([V.INT32, V.UINT32, V.FLOAT32, V.UINT8])
    n = rng.choice([0, 1, 2, 3, 15, 16, 17, rng.randint(0, 200)])
    return (V.ARRAY, [rng.randint(0, 100) for _ in range(n)], t)


def spec_mutation(rng: random.Random, kvs: list, tensors: list) -> str:
    kind = rng.randrange(5)
    if kind == 0:   # a key gets another type or value; a count gets an extreme one
        ints = [i for i, kv in enumerate(kvs) if kv[1] in (V.UINT32, V.UINT64)]
        i = rng.choice(ints) if ints and rng.random() < 0.5 else rng.randrange(len(kvs))
        kvs[i] = (kvs[i][0], *_random_value(rng, integer=rng.random() < 0.5))
        return f"{kvs[i][0]} = {str(kvs[i][1:])[:60]}"
    if kind == 1 and tensors:   # a layer index from far away
        i = rng.randrange(len(tensors))
        name, *rest = tensors[i]
        new = name.replace("blk.0.", f"blk.{rng.choice([2, 3, 99, 10**6, 10**18, 2**64, 10**40])}.")
        if new != name and len(new) < 64 and new not in {t[0] for t in tensors}:
            tensors[i] = (new, *rest)
        return f"tensor {name!r} renamed {new!r}"
    if kind == 2 and tensors:   # a tensor gone
        return f"tensor {tensors.pop(rng.randrange(len(tensors)))[0]!r} dropped"
    if kind == 3:   # a key gone
        return f"key {kvs.pop(rng.randrange(len(kvs)))[0]!r} dropped"
    if tensors:     # a tensor of another shape or type
        i = rng.randrange(len(tensors))
        name, shape, _, _ = tensors[i]
        qtype = rng.choice([Q.F32, Q.F16, Q.Q8_0, Q.Q4_K, Q.I32])
        block = GGML_QUANT_SIZES[qtype][0]
        shape = tuple(rng.choice([0, 1, 2, 16]) for _ in range(rng.randint(0, 3))) + \
            (block * rng.choice([1, 2, 8]),)
        tensors[i] = (name, shape, qtype, _random_bytes(rng, shape, qtype))
        return f"tensor {name!r} is {qtype.name} {shape}"
    return "nothing"


# ---------------------------------------------------------------------------------------
# running one case: the reader, the checks, the CLI, the budget


class Budget:
    """Time of each case; memory of each case: the resident set's high-water mark (cheap,
    every case) and, for every TRACE_EVERY-th case, the peak of traced allocations (numpy
    reports its buffers to tracemalloc), which sees a big allocation even below the
    high-water mark that earlier tests left."""

    TRACE_EVERY = 8  # tracemalloc makes a case about 4x slower

    def __init__(self):
        self.n = 0
        self.worst_seconds = 0.0
        self.worst_traced = 0
        self.rss0 = self.rss = self._maxrss()

    @staticmethod
    def _maxrss() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10  # KiB on Linux

    def case(self, what: str, fn, *args):
        self.n += 1
        traced = self.n % self.TRACE_EVERY == 0
        if traced:
            tracemalloc.start()
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            seconds = time.perf_counter() - t0
            peak = tracemalloc.get_traced_memory()[1] if traced else 0
            if traced:
                tracemalloc.stop()
            rss, self.rss = self.rss, self._maxrss()
            self.worst_seconds = max(self.worst_seconds, seconds)
            self.worst_traced = max(self.worst_traced, peak)
            assert seconds < MAX_SECONDS, f"{what}: took {seconds:.2f} s"
            assert peak < MAX_CASE_BYTES, f"{what}: allocated {peak >> 20} MiB"
            assert self.rss - rss < MAX_CASE_BYTES, \
                f"{what}: resident set grew by {(self.rss - rss) >> 20} MiB"

    def report(self, what: str, outcomes: dict) -> str:
        assert self.rss - self.rss0 < MAX_RSS_GROWTH, \
            f"resident set grew by {(self.rss - self.rss0) >> 20} MiB over the run"
        return (f"\n{what}: {outcomes}; slowest case {self.worst_seconds * 1e3:.1f} ms, most "
                f"traced memory {self.worst_traced / 2**20:.2f} MiB, resident set grew "
                f"{(self.rss - self.rss0) / 2**20:.1f} MiB")


def open_gguf(path: Path, data: bytes) -> tuple[str, str]:
    """('accepted' | 'rejected' | 'inconsistent', message). Anything but FormatError
    escapes and fails the test."""
    try:
        g = GGUFFile.open(path)
    except FormatError as e:
        assert str(path) in str(e)
        return "rejected", str(e)
    with g:
        check_gguf_invariants(g, data)
        try:
            check_model_metadata(g)
        except FormatError as e:
            assert str(path) in str(e)
            return "inconsistent", str(e)
    return "accepted", ""


def check_gguf_invariants(g: GGUFFile, data: bytes) -> None:
    """What the reader promises about a file it accepts, checked from scratch."""
    a = g.alignment
    assert g.version in (2, 3) and a > 0 and a & (a - 1) == 0 and g.data_offset % a == 0
    spans = []
    for name, t in g.tensors.items():
        assert 0 < len(name.encode()) < 64 and 1 <= len(t.dims) <= 4
        block, _ = GGML_QUANT_SIZES[Q(t.ggml_type)]
        assert t.dims[0] % block == 0 and t.nbytes == _nbytes(t.dims, t.ggml_type)
        assert t.offset >= g.data_offset and (t.offset - g.data_offset) % a == 0
        assert t.offset + t.nbytes <= len(data)
        raw = g.raw(name)
        assert raw.tobytes() == data[t.offset:t.offset + t.nbytes]
        assert g.array(name).nbytes == t.nbytes
        if t.nbytes:
            spans.append((t.offset, t.offset + t.nbytes))
    spans.sort()
    assert all(e0 <= s1 for (_, e0), (s1, _) in zip(spans, spans[1:])), "tensors overlap"


def check_inspect(path: Path, outcome: str, as_json: bool) -> None:
    """`ggforge inspect`: the reader's verdict, as output or as one `error:` line."""
    r = CliRunner().invoke(cli, ["inspect", str(path)] + (["--json"] if as_json else []))
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise AssertionError(f"inspect {path} raised {r.exception!r}") from r.exception
    if outcome == "rejected":
        lines = r.stderr.strip().splitlines()
        assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        assert str(path) in lines[0] and r.stdout == ""
    else:
        assert r.exit_code == 0 and r.stderr == "", r.output
        if as_json:
            assert json.loads(r.stdout)["file"] == str(path)


def _judge(outcome: str, msg: str, expect: str | None, where: str) -> None:
    if expect == "open":
        assert outcome != "rejected", f"{where}: a well-formed file was rejected: {msg}"
    elif expect is not None:
        assert outcome == "rejected", f"{where}: expected a rejection ({expect})"
        assert expect == "reject" or expect in msg, f"{where}: {expect!r} not in {msg!r}"


def gguf_case(rng: random.Random) -> tuple[bytes, str, str | None]:
    """One mutated file: spec mutations (a well-formed file), byte mutations, or both."""
    kvs, tensors = model_spec(rng)
    if rng.random() < 0.2:
        tensors = []  # vocab-only: llama.cpp ships such files (block_count, no blk.* tensors)
    what, expect = [], None
    if rng.random() < 0.4:
        what = [spec_mutation(rng, kvs, tensors) for _ in range(rng.randint(1, 3))]
        expect = "open"  # our writer made it: well-formed, whatever the metadata says
    alignment = rng.choice([32, 32, 32, 1, 8, 64])
    data = build_gguf(kvs, tensors, alignment)
    if not what or rng.random() < 0.5:
        lay = gguf_layout(data)
        live = sum(1 for _, n in lay.tensors.values() if n)
        muts = [m for m, w in GGUF_MUTATIONS for _ in range(w)
                if (m not in (mutate_flip_data, mutate_overlap) or live > 2)
                and (m is not mutate_duplicate_name or len(lay.keys) > 1)]
        n = 1 if rng.random() < 0.7 else rng.randint(2, 4)
        chosen = [rng.choice(muts) for _ in range(n)]
        # the layout holds for in-place changes; at most one that moves bytes, last
        chosen = ([m for m in chosen if m not in RESHAPING]
                  + [m for m in chosen if m in RESHAPING][:1])
        for m in chosen:
            data, w, expect = m(rng, bytes(data), lay)
            what.append(w)
        if n > 1:
            expect = None  # a second mutation may change the answer
    return bytes(data), "; ".join(what), expect


def test_fuzz_gguf_reader_and_inspect(tmp_path, n_cases):
    outcomes = {"accepted": 0, "rejected": 0, "inconsistent": 0}
    path, budget = tmp_path / "case.gguf", Budget()
    for i in range(n_cases):
        rng = random.Random(f"gguf-{i}")
        data, what, expect = gguf_case(rng)
        path.write_bytes(data)
        where = f"gguf case {i} ({what})"
        try:
            outcome, msg = budget.case(where, open_gguf, path, data)
            _judge(outcome, msg, expect, where)
            if i % 4 == 0:
                budget.case(where + ", inspect", check_inspect, path, outcome, i % 8 == 0)
        except BaseException:
            (tmp_path / f"failed-{i}.gguf").write_bytes(data)
            raise
        outcomes[outcome] += 1
    print(budget.report(f"{n_cases} GGUF cases", outcomes))
    assert n_cases < 100 or min(outcomes.values()) > n_cases // 50  # every path was taken


# ---------------------------------------------------------------------------------------
# safetensors: a header of entries (kept as a list, so names can repeat) and a data section


ST_TENSORS = [("model.embed.weight", "F32", [4, 8]), ("a.f16", "F16", [3, 5]),
              ("b.bf16", "BF16", [7]), ("c.i64", "I64", [2, 2]), ("d.bool", "BOOL", [5]),
              ("e.u8", "U8", [3]), ("f.f8", "F8_E4M3", [4]), ("g.f4", "F4", [6]),
              ("h.scalar", "F64", []), ("i.empty", "F32", [0, 3]), ("j.c64", "C64", [2])]


@dataclass
class StFile:
    entries: list        # [name, value]: value is normally {"dtype", "shape", "data_offsets"}
    data: bytes
    metadata: object = None
    text: str | None = None  # the header text, when a mutation wrote it by hand
    pad: str = ""

    def header(self) -> str:
        if self.text is not None:
            return self.text
        meta = [["__metadata__", self.metadata]] if self.metadata is not None else []
        items = meta + self.entries
        return "{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in items) + "}"

    def to_bytes(self) -> bytes:
        h = self.header().encode("utf-8", "surrogatepass") + self.pad.encode()
        h += b" " * (-len(h) % 8)
        return struct.pack("<Q", len(h)) + h + self.data


def st_base(rng: random.Random) -> StFile:
    order = list(ST_TENSORS)
    rng.shuffle(order)  # data in another order than the header
    offsets, pos = {}, 0
    for name, dtype, shape in order:
        n = _count(shape) * DTYPES[dtype].bits // 8
        offsets[name] = [pos, pos + n]
        pos += n
    entries = [[n, {"dtype": d, "shape": s, "data_offsets": offsets[n]}] for n, d, s in ST_TENSORS]
    return StFile(entries, rng.randbytes(pos), {"format": "pt"})


def _count(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


ST_KEYS = ("dtype", "shape", "data_offsets")
WEIRD = [None, True, 1.5, -1, 2**64, "F32", "", [], {}, [[1]], [1, 2, 3], {"a": 1}, "x" * 300]


def st_mutation(rng: random.Random, f: StFile) -> tuple[StFile | bytes, str, str | None]:
    """One mutation: the file (or raw bytes) with what was done and the expectation."""
    clean = [x for x in f.entries if isinstance(x[1], dict) and set(x[1]) == set(ST_KEYS)
             and isinstance(x[1]["data_offsets"], list) and len(x[1]["data_offsets"]) == 2
             and all(type(o) is int for o in x[1]["data_offsets"])]
    if not clean:  # an earlier mutation broke them all
        f.text = f.header()
        return f, "header kept as text", None
    name, e = rng.choice(clean)
    size = e["data_offsets"][1] - e["data_offsets"][0]
    kind = rng.randrange(14)
    if kind == 0:
        e["dtype"] = rng.choice(["F12", "f32", "INT4", "", "F32 ", 32, None, ["F32"]])
        return f, f"dtype of {name!r} = {e['dtype']!r}", "unknown dtype"
    if kind == 1:
        e["dtype"] = rng.choice(list(DTYPES))
        return f, f"dtype of {name!r} = {e['dtype']}", None
    if kind == 2:
        e["shape"] = rng.choice([[-1], [1.0], ["1"], [True], "1", None, [[2]], {"0": 1}])
        return f, f"shape of {name!r} = {e['shape']!r}", "shape"
    if kind == 3:
        e["shape"] = rng.choice([[2**64], [2**62, 2**62], [0], [], [1] * 64, [size], [size * 8],
                                 [2**31, 2**31, 2**31, 2**31]])
        return f, f"shape of {name!r} = {e['shape']}", None
    if kind == 4:
        b, end = e["data_offsets"]
        e["data_offsets"] = rng.choice([[b, end + len(f.data) + 1], [-1, end], [b, 2**64],
                                        [b + 1, end + 1], [2**63, 2**63 + size]]
                                       + ([[end, b], [b + 1, end]] if size else []))
        return f, f"data_offsets of {name!r} = {e['data_offsets']}", "reject"
    if kind == 5:
        e["data_offsets"] = rng.choice([[0], [0, 1, 2], ["0", "4"], [0.0, 4], None, {}, 4])
        return f, f"data_offsets of {name!r} = {e['data_offsets']!r}", "data_offsets"
    if kind == 6:
        if rng.random() < 0.5:
            del e[rng.choice(list(e))]
        else:
            e[rng.choice(["offsets", "dtype ", "", "begin"])] = rng.choice(WEIRD)
        return f, f"keys of {name!r}: {sorted(e)}", "reject"
    if kind == 7:
        f.entries = [[n, v] for n, v in f.entries if n != name]
        return f, f"entry {name!r} dropped", "reject" if size else "open"
    if kind == 8:
        other = rng.choice(f.entries)[1]
        f.entries.insert(rng.randrange(len(f.entries) + 1), [name, dict(other)])
        return f, f"a second {name!r}", "twice"
    if kind == 9:
        f.metadata = rng.choice([{"k": 1}, [], "x", {"k": {"a": "b"}}, {"k": None}, 7])
        return f, f"__metadata__ = {f.metadata!r}", "__metadata__"
    if kind == 10:
        f.pad = rng.choice(["", " " * rng.randint(1, 64), "\n", "\t", "\0", "x", "}", " \n "])
        return f, f"padding {f.pad!r}", "open" if not f.pad.strip(" ") else "reject"
    if kind == 11:
        f.text = rng.choice(["[]", "null", "1", '"x"', "{", '{"a": 1', " {}", "\ufeff{}",
                             "{" + '"a": ' + "[" * 100_000 + "]" * 100_000 + "}",
                             '{"a": ' + "9" * 5000 + "}", '{"a": 1e999}', '{"a": NaN}',
                             '{"a": Infinity}', '{"\\ud800": 1}', "{}" + "\0" * 7])
        return f, f"header text {f.text[:20]!r}", "reject"
    if kind == 12:
        entry = next(x for x in f.entries if x[0] == name)
        entry[0] = rng.choice(["", "\0", "é🦙", "x" * 10_000, "__metadata__ ", "a.f16 ",
                               "\ud800"])
        # a lone surrogate (JSON "\\ud800") is not Unicode: the safetensors library refuses it
        expect = "reject" if entry[0] == "\ud800" else "open"
        return f, f"{name!r} renamed {entry[0][:20]!r}", expect
    (n2, e2) = rng.choice(clean)
    e["data_offsets"], e2["data_offsets"] = e2["data_offsets"], e["data_offsets"]
    return f, f"offsets of {name!r} and {n2!r} swapped", None


def st_byte_mutation(rng: random.Random, data: bytes) -> tuple[bytes, str, str | None]:
    n = struct.unpack_from("<Q", data)[0]
    kind = rng.randrange(5)
    if kind == 0:
        v = rng.choice([0, 1, 2, 7, 8, n - 1, n + 1, n + 8, len(data) - 8, len(data) - 7,
                        MAX_HEADER_BYTES, MAX_HEADER_BYTES + 1, 2**63, 2**64 - 1])
        out = struct.pack("<Q", v) + data[8:]
        expect = ("limit" if v > MAX_HEADER_BYTES else "past the end" if v + 8 > len(data)
                  else "open" if v == n else None)
        return out, f"header length {n} -> {v}", expect
    out = bytearray(data)
    if kind == 1:
        _flip(out, rng, 8, 8 + n, rng.randint(1, 8))
        return out, "bit flips in the header", None
    if kind == 2 and len(data) > 8 + n:
        _flip(out, rng, 8 + n, len(data), rng.randint(1, 8))
        return out, "bit flips in the data", "open"
    if kind == 3:
        cut = rng.randrange(len(data))
        return data[:cut], f"truncated to {cut}", "reject"
    return data + rng.randbytes(rng.randint(1, 64)), "bytes appended", "trailing"


def st_case(rng: random.Random) -> tuple[bytes, str, str | None]:
    f = st_base(rng)
    what, expect = [], None
    n = 1 if rng.random() < 0.7 else rng.randint(2, 3)
    for _ in range(n if rng.random() < 0.6 else 0):
        f, w, expect = st_mutation(rng, f)
        what.append(w)
    data = f.to_bytes()
    if not what or rng.random() < 0.3:
        data, w, expect = st_byte_mutation(rng, data)
        what.append(w)
    return bytes(data), "; ".join(what), expect if len(what) == 1 else None


def open_safetensors(path: Path, data: bytes) -> tuple[str, str]:
    try:
        f = SafetensorsFile.open(path)
    except FormatError as e:
        assert path.name in str(e)
        return "rejected", str(e)
    with f:
        check_safetensors_invariants(f, data)
    return "accepted", ""


def check_safetensors_invariants(f: SafetensorsFile, data: bytes) -> None:
    """Accepted: entries tile the data section exactly, and each reads as its bytes say."""
    n = struct.unpack_from("<Q", data)[0]
    assert 8 + n <= len(data) and n <= MAX_HEADER_BYTES
    pos = 8 + n
    for e in sorted(f.tensors.values(), key=lambda e: (e.offset, e.nbytes)):
        assert e.offset == pos and _count(e.shape) * DTYPES[e.dtype].bits == 8 * e.nbytes
        pos += e.nbytes
        storage = DTYPES[e.dtype].numpy
        if storage is None:
            with pytest.raises(UnsupportedModelError):
                f.read(e.name)
            continue
        want = np.frombuffer(data, storage, _count(e.shape), e.offset).reshape(e.shape)
        got = f.read(e.name)
        assert got.shape == e.shape
        np.testing.assert_array_equal(got, (want != 0) if e.dtype == "BOOL" else want)
        if e.dtype in ("F32", "F16", "BF16", "F64"):
            assert f.read_float32(e.name).shape == e.shape
    assert pos == len(data)


def test_fuzz_safetensors_reader_and_inspect(tmp_path, n_cases):
    outcomes = {"accepted": 0, "rejected": 0}
    path, budget = tmp_path / "case.safetensors", Budget()
    for i in range(n_cases):
        data, what, expect = st_case(random.Random(f"safetensors-{i}"))
        path.write_bytes(data)
        where = f"safetensors case {i} ({what})"
        try:
            outcome, msg = budget.case(where, open_safetensors, path, data)
            _judge(outcome, msg, expect, where)
            if i % 4 == 0:
                budget.case(where + ", inspect", check_inspect, path, outcome, i % 8 == 0)
        except BaseException:
            (tmp_path / f"failed-{i}.safetensors").write_bytes(data)
            raise
        outcomes[outcome] += 1
    print(budget.report(f"{n_cases} safetensors cases", outcomes))
    assert n_cases < 100 or min(outcomes.values()) > n_cases // 50


# ---------------------------------------------------------------------------------------
# sharded checkpoints: the index names the files, so a name must never leave the folder


SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def index_case(rng: random.Random, folder: Path) -> tuple[str, str | None]:
    """Writes two valid shards and a (mutated) index into `folder`."""
    weight_map = {}
    for shard, names in zip(SHARDS, (ST_TENSORS[:5], ST_TENSORS[5:])):
        f = st_base(rng)
        f.entries = [x for x in f.entries if x[0] in {n for n, _, _ in names}]
        pos = 0
        for _, e in sorted(f.entries, key=lambda x: x[1]["data_offsets"][0]):
            n = e["data_offsets"][1] - e["data_offsets"][0]
            e["data_offsets"], pos = [pos, pos + n], pos + n
        f.data = f.data[:pos]
        (folder / shard).write_bytes(f.to_bytes())
        weight_map.update({name: shard for name, _ in f.entries})
    name = rng.choice(list(weight_map))
    kind, expect = rng.randrange(9), "reject"
    if kind == 0:
        weight_map[name] = rng.choice(["../outside.safetensors", "/etc/passwd", "C:\\x", "",
                                       "x" * 300 + ".safetensors", "a\0b.safetensors", 7, None,
                                       "sub/../../x", "missing.safetensors", [SHARDS[0]]])
        what = f"{name!r} in {weight_map[name]!r}"
    elif kind == 1:
        weight_map[name] = SHARDS[SHARDS.index(weight_map[name]) - 1]
        what = f"{name!r} in the other shard"
    elif kind == 2:
        weight_map["ghost.weight"] = rng.choice(SHARDS)
        what = "a tensor no shard holds"
    elif kind == 3:
        del weight_map[name]
        what = f"{name!r} not listed"
    elif kind == 4:
        text = json.dumps({"weight_map": weight_map})
        text = text[:-2] + f', {json.dumps(name)}: "{weight_map[name]}"' + "}}"
        (folder / "model.safetensors.index.json").write_text(text)
        return f"{name!r} listed twice", "twice"
    elif kind == 5:
        doc = rng.choice([[], {}, {"weight_map": []}, {"weight_map": {}}, {"weight_map": None}])
        (folder / "model.safetensors.index.json").write_text(json.dumps(doc))
        return f"index {doc!r}", "reject"
    elif kind == 6:  # a shard that is itself broken
        data, what, _ = st_byte_mutation(rng, (folder / SHARDS[0]).read_bytes())
        (folder / SHARDS[0]).write_bytes(data)
        expect = None
    else:
        what, expect = "nothing", "open"
    raw = bytearray(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}).encode())
    if kind == 7:
        _flip(raw, rng, 0, len(raw), rng.randint(1, 4))
        what, expect = "bit flips in the index", None
    (folder / "model.safetensors.index.json").write_bytes(raw)
    return what, expect


def open_checkpoint(folder: Path) -> tuple[str, str]:
    try:
        ckpt = Checkpoint.open(folder)
    except FormatError as e:
        return "rejected", str(e)
    with ckpt:
        assert {Path(p).parent for p in ckpt.files} == {folder}
        for name, e in ckpt.tensors.items():
            if DTYPES[e.dtype].numpy is not None:
                assert ckpt.read(name).shape == e.shape
    return "accepted", ""


def test_fuzz_shard_index(tmp_path, n_cases):
    # a valid file where "../outside.safetensors" points: reachable if a name could escape
    (tmp_path / "outside.safetensors").write_bytes(st_base(random.Random(0)).to_bytes())
    outcomes = {"accepted": 0, "rejected": 0}
    budget = Budget()
    for i in range(max(20, n_cases // 10)):
        folder = tmp_path / f"m{i % 2}"
        folder.mkdir(exist_ok=True)
        what, expect = index_case(random.Random(f"index-{i}"), folder)
        where = f"index case {i} ({what})"
        outcome, msg = budget.case(where, open_checkpoint, folder)
        _judge(outcome, msg, expect, where)
        outcomes[outcome] += 1
    print(budget.report("shard index cases", outcomes))
    assert outcomes["rejected"] and outcomes["accepted"]


# ---------------------------------------------------------------------------------------
# hypothesis: any JSON where a header entry's fields go


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: (st.lists(inner, max_size=4)
                   | st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12)
_ints = st.integers(-3, 2**64 + 1) | st.sampled_from([0, 1, 2, 3, 4, 8, 16, 24, 32, 64])
_entry = st.fixed_dictionaries({
    "dtype": st.sampled_from(list(DTYPES)) | _json,
    "shape": st.lists(_ints, max_size=4) | _json,
    "data_offsets": st.lists(_ints, min_size=2, max_size=2) | st.lists(_ints, max_size=3) | _json,
}) | _json


@pytest.fixture(scope="module")
def hypothesis_cases(n_cases) -> int:
    return max(20, n_cases // 3)


def test_hypothesis_safetensors_header(tmp_path_factory, hypothesis_cases):
    folder = tmp_path_factory.mktemp("hyp")

    @settings(max_examples=hypothesis_cases, deadline=int(MAX_SECONDS * 1000), database=None,
              derandomize=True, suppress_health_check=list(HealthCheck))
    @given(header=st.dictionaries(st.text(max_size=6), _entry, max_size=4),
           data=st.binary(max_size=64))
    def case(header, data):
        text = json.dumps(header).encode("utf-8", "surrogatepass")
        raw = struct.pack("<Q", len(text)) + text + data
        path = folder / "h.safetensors"
        path.write_bytes(raw)
        open_safetensors(path, raw)  # FormatError is caught there; anything else fails

    case()


def test_inspect_subprocess_one_error_line(tmp_path):
    """The real executable: exit status 1, one `error:` line, no traceback."""
    rng = random.Random("subprocess")
    bad = {"truncated.gguf": build_gguf(*model_spec(rng))[:200],
           "bad.safetensors": struct.pack("<Q", 2**63) + b"{}"}
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
        p = subprocess.run([sys.executable, "-m", "ggforge.tools", "inspect", str(tmp_path / name)],
                           capture_output=True, text=True, timeout=60, env=subprocess_env())
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), p.stderr
        assert name in lines[0] and p.stdout == ""


def subprocess_env() -> dict:
    """This environment, with the folder ggforge was imported from first on the path."""
    import os

    import ggforge

    env = dict(os.environ)
    root = str(Path(ggforge.__path__[0]).parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


# ---------------------------------------------------------------------------------------
# the runtime's loader: a well-formed file whose metadata and tensors lie


def runtime_case(rng: random.Random, mutate: bool = True) -> tuple[bytes, str]:
    """The tiny model in F32, with 0 to 2 spec mutations. Weights are encodings of small
    finite values in whatever type they end up with, so that a NaN can only come from the
    metadata (random Q8_0 bytes hold NaN scales: NaN weights, NaN logits, as in llama.cpp)."""
    from ggforge.formats.quants import quantize

    kvs, tensors = model_spec(rng)
    tensors = [(n, s, Q.F32, b"") for n, s, _, _ in tensors if n != "empty.weight"]
    what = [spec_mutation(rng, kvs, tensors) for _ in range(rng.randint(0, 2) if mutate else 0)]
    np_rng = np.random.default_rng(rng.randrange(2**32))

    def finite(shape, qtype) -> bytes:
        if qtype == Q.I32 or _nbytes(shape, qtype) == 0:
            return bytes(_nbytes(shape, qtype))
        x = (np_rng.standard_normal(shape) * 0.1).astype(np.float32)
        return quantize(x.reshape(-1, shape[-1]), qtype.name).tobytes()

    tensors = [(n, s, t, finite(s, t)) for n, s, t, _ in tensors]
    return build_gguf(kvs, tensors), "; ".join(what) or "none"


def run_model(path: Path) -> str:
    """load, eval and generate: our errors (all ValueErrors, one line in the CLI) or
    finite logits; a plain ValueError ("invalid literal", "truth value ... ambiguous",
    "Probabilities contain NaN") is not a clear error and fails too."""
    from ggforge.formats.errors import QuantizationError
    from ggforge.runtime.generate import load
    from ggforge.runtime.kv_cache import CacheTooLargeError, ContextFullError
    from ggforge.runtime.sampling import SamplerSettings

    ours = (FormatError, UnsupportedModelError, QuantizationError, ContextFullError,
            CacheTooLargeError)
    try:
        with load(path, n_ctx=16) as m:
            logits = m.eval([1, 2, 3])
            assert logits.shape == (3, m.model.config.n_vocab) and np.isfinite(logits).all()
            list(m.generate_tokens([1, 2], max_tokens=2,
                                   settings=SamplerSettings(temperature=0.0)))
    except ours:
        return "rejected"
    return "ran"


def test_fuzz_runtime_loader(tmp_path, n_cases):
    path = tmp_path / "model.gguf"
    path.write_bytes(runtime_case(random.Random("warm-up"), mutate=False)[0])
    assert run_model(path) == "ran"  # kernels compiled or loaded from numba's cache, unbudgeted
    outcomes = {"ran": 0, "rejected": 0}
    budget = Budget()
    for i in range(max(20, n_cases // 2)):
        data, what = runtime_case(random.Random(f"runtime-{i}"))
        path.write_bytes(data)
        where = f"runtime case {i} ({what})"
        try:
            outcomes[budget.case(where, run_model, path)] += 1
        except BaseException:
            (tmp_path / f"failed-{i}.gguf").write_bytes(data)
            raise
    print(budget.report("runtime loader cases", outcomes))
    assert outcomes["ran"] and outcomes["rejected"]


# ---------------------------------------------------------------------------------------
# what the fuzzing found, each as a hand-built file


def _with(kvs: list, key: str, vtype, value) -> list:
    return [(key, vtype, value) if kv[0] == key else kv for kv in kvs]


def test_huge_block_count_is_checked_without_looping_over_it(tmp_path):
    """A vocab-only file (no blk.* tensors, as llama.cpp ships them) claiming 2**63 layers:
    the semantic checks built a list of, and looped over, every layer the number claimed
    (a 50331648 found by the fuzzer took 150 s)."""
    kvs, _ = model_spec(random.Random(0))
    path = tmp_path / "vocab.gguf"
    path.write_bytes(build_gguf(_with(kvs, "llama.block_count", V.UINT64, 2**63), []))
    t0 = time.perf_counter()
    with GGUFFile.open(path) as g:
        check_model_metadata(g)  # no layer tensors: nothing contradicts the count
    assert time.perf_counter() - t0 < 0.5


def test_layer_numbers_far_apart_are_checked_without_a_range(tmp_path):
    """blk.0 and blk.10**15 under a huge block_count: finding the first missing layer built
    set(range(10**15))."""
    kvs, tensors = model_spec(random.Random(0))
    tensors = [(n.replace("blk.1.", f"blk.{10**15}."), *rest) for n, *rest in tensors]
    path = tmp_path / "gap.gguf"
    path.write_bytes(build_gguf(_with(kvs, "llama.block_count", V.UINT64, 2**63), tensors))
    t0 = time.perf_counter()
    with GGUFFile.open(path) as g, pytest.raises(FormatError, match="no blk.1.. tensors"):
        check_model_metadata(g)
    assert time.perf_counter() - t0 < 0.5


@pytest.mark.parametrize("where", ["name", "metadata"])
def test_safetensors_lone_surrogate_escape(tmp_path, where):
    """JSON's "\\ud800" decodes to a str that is not Unicode: the reader took it and
    `inspect` died printing it. The safetensors library refuses such a header."""
    f = st_base(random.Random(0))
    if where == "name":
        f.entries[0][0] = "\ud800"
    else:
        f.metadata = {"format": "pt\udfff"}
    path = tmp_path / "s.safetensors"
    path.write_bytes(f.to_bytes())
    with pytest.raises(FormatError, match="lone UTF-16 surrogate"):
        SafetensorsFile.open(path)
    r = CliRunner().invoke(cli, ["inspect", str(path)])
    assert r.exit_code == 1 and r.stdout == "" and r.stderr.startswith("error: ")
    assert len(r.stderr.splitlines()) == 1 and "surrogate" in r.stderr
    # a surrogate pair is one valid character, and an escaped backslash is no escape
    f.entries[0][0], f.metadata = "\U0001f999 \\ud800", {"format": "pt"}
    path.write_bytes(f.to_bytes())
    with SafetensorsFile.open(path) as s:
        assert "\U0001f999 \\ud800" in s.tensors


def test_shard_name_too_long_for_the_filesystem(tmp_path):
    """The index's shard name reached os.stat: OSError (File name too long), not FormatError."""
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "x" * 300 + ".safetensors"}}))
    with pytest.raises(FormatError, match="cannot be opened: File name too long"):
        Checkpoint.open(tmp_path)
