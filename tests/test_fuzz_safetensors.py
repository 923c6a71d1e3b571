"""Fuzzing the safetensors reader and `ggforge inspect` on mutated safetensors files, with
a seeded mutator and with hypothesis (the shared parts: fuzz_helpers.py)."""
from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import fuzz_helpers
import numpy as np
import pytest
from click.testing import CliRunner
from fuzz_helpers import (
    MAX_SECONDS,
    Budget,
    StFile,
    _count,
    _judge,
    check_inspect,
    st_base,
    st_byte_mutation,
)
from ggforge.formats.errors import FormatError, UnsupportedModelError
from ggforge.formats.safetensors import DTYPES, MAX_HEADER_BYTES, SafetensorsFile
from ggforge.tools.cli import cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

n_cases = fuzz_helpers.n_cases  # the fixture (--fuzz-cases): pytest finds it by this name

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
