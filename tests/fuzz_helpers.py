"""What the fuzz tests (tests/test_fuzz_*.py) share: fuzzing the readers of untrusted model
files (RELIABILITY.md): GGUF, safetensors, shard indexes, the runtime's loader, and
`ggforge inspect`.

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

    python -m pytest -q tests/test_fuzz_*.py                      # a few hundred cases
    python -m pytest -q tests/test_fuzz_*.py --fuzz-cases 20000   # the long run
"""
from __future__ import annotations

import json
import random
import resource
import struct
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from ggforge.formats.gguf_writer import GGUFWriter
from ggforge.formats.safetensors import DTYPES, MAX_HEADER_BYTES
from ggforge.tools.cli import cli
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

# per case (RELIABILITY.md: no hang), in this thread's CPU seconds (time.thread_time):
# a busy shared machine slows the wall clock, not the work a case does
MAX_SECONDS = 1.0
MAX_CASE_BYTES = 64 << 20      # traced allocation per case; the inputs are < 1 MiB
MAX_RSS_GROWTH = 256 << 20     # resident set growth over a whole run
SIZES = {V.UINT8: 1, V.INT8: 1, V.BOOL: 1, V.UINT16: 2, V.INT16: 2, V.UINT32: 4, V.INT32: 4,
         V.FLOAT32: 4, V.UINT64: 8, V.INT64: 8, V.FLOAT64: 8}



@pytest.fixture(scope="module")
def n_cases(request) -> int:
    return max(1, request.config.getoption("--fuzz-cases"))


# ---------------------------------------------------------------------------------------
# valid GGUF files from a spec (where their fields lie: test_fuzz_gguf.py)


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


def _flip(data: bytearray, rng: random.Random, lo: int, hi: int, n: int) -> None:
    for _ in range(n):
        data[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)


# ---------------------------------------------------------------------------------------
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
        t0 = time.thread_time()
        try:
            return fn(*args)
        finally:
            seconds = time.thread_time() - t0
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
