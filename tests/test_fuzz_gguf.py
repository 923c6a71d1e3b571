"""Fuzzing the GGUF reader and `ggforge inspect` on mutated GGUF files, and the cases the
fuzzing found (the shared parts, and how to run the long run: fuzz_helpers.py)."""
from __future__ import annotations

import itertools
import random
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import fuzz_helpers
import pytest
from fuzz_helpers import (
    SIZES,
    Budget,
    _flip,
    _judge,
    _nbytes,
    build_gguf,
    check_inspect,
    model_spec,
    spec_mutation,
)
from ggforge.formats.errors import FormatError
from ggforge.formats.gguf_checks import check_model_metadata
from ggforge.formats.gguf_reader import REMOVED_TYPES, GGUFFile
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

n_cases = fuzz_helpers.n_cases  # the fixture (--fuzz-cases): pytest finds it by this name

# ---------------------------------------------------------------------------------------
# where the fields of a valid GGUF file lie


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
    assert all(e0 <= s1 for (_, e0), (s1, _) in itertools.pairwise(spans)), "tensors overlap"


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
    t0 = time.thread_time()
    with GGUFFile.open(path) as g:
        check_model_metadata(g)  # no layer tensors: nothing contradicts the count
    assert time.thread_time() - t0 < 0.5


def test_layer_numbers_far_apart_are_checked_without_a_range(tmp_path):
    """blk.0 and blk.10**15 under a huge block_count: finding the first missing layer built
    set(range(10**15))."""
    kvs, tensors = model_spec(random.Random(0))
    tensors = [(n.replace("blk.1.", f"blk.{10**15}."), *rest) for n, *rest in tensors]
    path = tmp_path / "gap.gguf"
    path.write_bytes(build_gguf(_with(kvs, "llama.block_count", V.UINT64, 2**63), tensors))
    t0 = time.thread_time()
    with GGUFFile.open(path) as g, pytest.raises(FormatError, match="no blk.1.. tensors"):
        check_model_metadata(g)
    assert time.thread_time() - t0 < 0.5
