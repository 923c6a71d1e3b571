"""Q8_0 decode tiles, swept end to end through the public command line: for each
candidate tile (rows BM x columns BK, warps), every Q8_0-planar product of MODEL decodes
with it (the public API: gpu.configure(q8_tiles=...), then the bench of `ggforge bench
-ngl all`), and the tg t/s of each candidate is printed;
the fastest candidate's tile file is written to $OUT/q8_tiles.json, ready for
`ggforge bench --q8-tiles` or `ggforge.runtime.gpu.configure(q8_tiles=...)`.

    python3 scripts/device/q8_sweep.py MODEL.gguf [-n 128] [-r 3]
"""
import argparse
import json
import os
import re
from pathlib import Path

from ggforge.formats.gguf_reader import GGUFFile
from ggforge.runtime import gpu
from ggforge.runtime.gpu.bench import bench_offload

CANDIDATES = [(bm, bk, w) for bm in (2, 4, 8, 16) for bk in (256, 512, 1024, 2048) for w in (4, 8)]


def shapes(path: str) -> set[str]:
    """NOUTxNIN of every Q8_0 matrix of the file (q|k|v and gate|up stacked as at upload)."""
    out, by_layer = set(), {}
    with GGUFFile.open(path) as g:
        for name, info in g.tensors.items():
            if info.type_name == "Q8_0" and len(info.shape) == 2:
                n_out, n_in = (int(v) for v in info.shape)   # numpy order
                out.add(f"{n_out}x{n_in}")
                m = re.match(r"blk\.(\d+)\.(attn_[qkv]|ffn_gate|ffn_up)\.weight", name)
                if m:
                    group = "qkv" if m[2].startswith("attn") else "gate_up"
                    by_layer.setdefault((m[1], group), []).append((n_out, n_in))
    for parts in by_layer.values():
        out.add(f"{sum(o for o, _ in parts)}x{parts[0][1]}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", type=int, default=3)
    a = ap.parse_args()
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    keys, best = shapes(a.model), None
    for bm, bk, w in CANDIDATES:
        tiles = {k: {"BM": bm, "BK": bk, "num_warps": w} for k in keys}
        gpu.configure(q8_tiles=tiles)
        with GGUFFile.open(a.model) as g:
            n_layer = int(g.get(f"{g.get('general.architecture')}.block_count"))
        tg = bench_offload(Path(a.model), 16, a.n, a.r, n_layer + 1).tg_tps
        print(f"BM {bm:>2} BK {bk:>4} warps {w}: tg{a.n} {tg:8.1f} t/s", flush=True)
        if best is None or tg > best[0]:
            best = (tg, tiles)
    if best:
        (out / "q8_tiles.json").write_text(json.dumps(best[1], indent=1))
        print(f"fastest: {best[0]:.1f} t/s -> {out / 'q8_tiles.json'}")


if __name__ == "__main__":
    main()
