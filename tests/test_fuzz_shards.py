"""Fuzzing sharded checkpoints: the index names the files, so a name must never leave the
folder (the shared parts: fuzz_helpers.py)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import fuzz_helpers
import pytest
from fuzz_helpers import (
    ST_TENSORS,
    Budget,
    _flip,
    _judge,
    st_base,
    st_byte_mutation,
)
from ggforge.formats.checkpoint import Checkpoint
from ggforge.formats.errors import FormatError
from ggforge.formats.safetensors import DTYPES

n_cases = fuzz_helpers.n_cases  # the fixture (--fuzz-cases): pytest finds it by this name

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


def test_shard_name_too_long_for_the_filesystem(tmp_path):
    """The index's shard name reached os.stat: OSError (File name too long), not FormatError."""
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "x" * 300 + ".safetensors"}}))
    with pytest.raises(FormatError, match="cannot be opened: File name too long"):
        Checkpoint.open(tmp_path)
