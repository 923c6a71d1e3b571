"""A mapped GGUF model and its forward pass: segments of layers, each on a backend.

The layer's structure is runtime/decoder.py's, for every family and backend; this module
loads the weights (as the file holds them: mapped, quantized; norms and biases are small
F32 vectors) and runs the segments: the first layers on the CPU (runtime/cpu_ops.py), the
last ones and maybe the output head on a GPU (runtime/gpu/backend.py), the head on the CPU
when the GPU does not hold it. Only the hidden state crosses between segments.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ggforge.formats.errors import FormatError
from ggforge.formats.gguf_checks import check_model_metadata
from ggforge.formats.gguf_reader import GGUFFile
from ggforge.formats.quants import dequantize, get_type
from ggforge.runtime import kernels
from ggforge.runtime.config import ModelConfig
from ggforge.runtime.cpu_ops import CpuOps, Layer
from ggforge.runtime.decoder import Decoder
from ggforge.runtime.kv_cache import KVCache

F32 = np.float32
# llama.cpp's CUDA backend runs a host-resident weight's product on the GPU from this many
# tokens (ggml-cuda's offload_op min batch size)
OFFLOAD_MIN_BATCH = 32


class Model:
    """A mapped GGUF model: `forward(tokens, cache)` -> logits of the last tokens."""

    def __init__(self, path: str | Path):
        self.gpu = None            # GpuLayers of the offloaded layers (see offload())
        self.n_ctx_seq = None      # the context size asked for; None: each cache's size
        self.gguf = GGUFFile.open(path)
        try:
            check_model_metadata(self.gguf)  # contradictions named before any shape is used
            self.config = ModelConfig.from_gguf(self.gguf)
            self.decoder = Decoder(self.config)
            self._load()
        except BaseException:
            self.gguf.close()
            raise

    def close(self) -> None:
        self.gpu = None
        self.gguf.close()

    @property
    def n_cpu_layers(self) -> int:
        return self.config.n_layer if self.gpu is None else self.gpu.first

    def offload(self, gpu_layers: int, device=None) -> None:
        """Put the last ``gpu_layers`` layers on a torch device, counted as llama.cpp's
        --n-gpu-layers (n_layer + 1 adds the output head); see runtime/placement.py."""
        c = self.config
        gpu_layers = min(int(gpu_layers), c.n_layer + 1)
        if gpu_layers <= 0:
            self.gpu = None
            return
        from ggforge.runtime.gpu import backend_for
        self.gpu = backend_for(self, max(c.n_layer - gpu_layers, 0), gpu_layers > c.n_layer, device)

    # -- weights ----------------------------------------------------------------------
    def _vec(self, name: str, required: bool = True) -> np.ndarray | None:
        info = self.gguf.tensors.get(name)
        if info is None:
            if required:
                raise FormatError(f"{self.gguf.path}: tensor {name!r} is missing")
            return None
        # The length the metadata implies, by name (names not listed here are not checked).
        # A norm weight of another length would make the kernels read past its end.
        c = self.config
        lengths = {"attn_norm.weight": c.n_embd, "ffn_norm.weight": c.n_embd,
                   "output_norm.weight": c.n_embd, "post_attention_norm.weight": c.n_embd,
                   "post_ffw_norm.weight": c.n_embd, "attn_q.bias": c.n_head * c.head_dim,
                   "attn_k.bias": c.n_head_kv * c.head_dim,
                   "attn_v.bias": c.n_head_kv * c.head_dim_v,
                   "attn_q_norm.weight": c.head_dim, "attn_k_norm.weight": c.head_dim,
                   "rope_freqs.weight": c.n_rot // 2, "rope_factors_long.weight": c.n_rot // 2,
                   "rope_factors_short.weight": c.n_rot // 2}
        n = lengths.get(name.split(".", 2)[-1] if name.startswith("blk.") else name)
        if n is not None and info.dims != (n,):
            raise FormatError(f"{self.gguf.path}: tensor {name!r} has shape {info.shape}, "
                              f"the metadata implies ({n},)")
        try:
            qtype = get_type(info.ggml_type)
        except ValueError as e:  # a type we cannot dequantize: say which tensor of which file
            raise type(e)(f"{self.gguf.path}: tensor {name!r}: {e}") from None
        return dequantize(np.asarray(self.gguf.raw(name)), qtype, info.shape).reshape(-1)

    def _mat(self, name: str, n_in: int, n_out: int) -> kernels.QWeight:
        info = self.gguf.tensors.get(name)
        if info is None:
            raise FormatError(f"{self.gguf.path}: tensor {name!r} is missing")
        # dims exactly (checked before any view is made): a 3-D tensor with as many elements
        # or a zero-row tensor is as wrong as a transposed one
        if info.dims != (n_in, n_out):
            raise FormatError(f"{self.gguf.path}: tensor {name!r} has shape {info.shape}, "
                              f"the metadata implies {(n_out, n_in)}")
        w = kernels.QWeight.from_gguf(self.gguf, name)
        self.weight_names[id(w)] = name
        return w

    def _fused(self, name: str, n_in: int, parts: list[int]) -> list[kernels.QWeight]:
        """A fused projection (Phi-3's attn_qkv, ffn_up holding gate and up) as one weight
        per part: views of consecutive rows, each output computed as from the whole. The
        first part carries the tensor's name (an importance matrix sees its input once)."""
        w = self._mat(name, n_in, sum(parts))
        out, r0 = [], 0
        for n in parts:
            out.append(kernels.QWeight(w.raw[r0:r0 + n], w.ggml_type, n_in, n, mapped=w.mapped))
            self.weight_names[id(out[-1])] = name if r0 == 0 else None
            r0 += n
        return out

    def rope_factors(self, n_ctx: int) -> np.ndarray | None:
        """The rope frequency divisors for a context of n_ctx: rope_freqs, else (Phi-3
        longrope) the long factors past the original context and the short ones within it,
        as llama.cpp's get_rope_factors chooses (by the context size asked for, n_ctx_seq,
        where it is set: a short evaluation's cache is smaller)."""
        if self.rope_freqs is not None or self.rope_long is None:
            return self.rope_freqs
        return self.rope_long if (self.n_ctx_seq or n_ctx) > self.config.n_ctx_orig else self.rope_short

    def _load(self) -> None:
        c = self.config
        self.weight_names: dict[int, str] = {}   # id(QWeight) -> its GGUF tensor name
        q_out, kv_out, v_out = c.n_head * c.head_dim, c.n_head_kv * c.head_dim, c.n_head_kv * c.head_dim_v
        self.tok_embd = self._mat("token_embd.weight", c.n_embd, c.n_vocab)
        self.output = self.tok_embd if c.tied_output else self._mat("output.weight", c.n_embd, c.n_vocab)
        self.output_norm = self._vec("output_norm.weight")
        self.rope_freqs = self._vec("rope_freqs.weight", required=False)
        self.rope_long = self._vec("rope_factors_long.weight", required=False)
        self.rope_short = self._vec("rope_factors_short.weight", required=self.rope_long is not None)
        names = self.gguf.tensors
        self.layers = []
        for i in range(c.n_layer):
            p = f"blk.{i}."
            if p + "attn_qkv.weight" in names:
                wq, wk, wv = self._fused(p + "attn_qkv.weight", c.n_embd, [q_out, kv_out, v_out])
            else:
                wq, wk, wv = (self._mat(p + f"attn_{x}.weight", c.n_embd, n)
                              for x, n in (("q", q_out), ("k", kv_out), ("v", v_out)))
            if p + "ffn_gate.weight" in names:
                gate = self._mat(p + "ffn_gate.weight", c.n_embd, c.n_ff)
                up = self._mat(p + "ffn_up.weight", c.n_embd, c.n_ff)
            else:   # gate and up fused in ffn_up (2 * n_ff rows: the gate first)
                gate, up = self._fused(p + "ffn_up.weight", c.n_embd, [c.n_ff, c.n_ff])
            self.layers.append(Layer(
                attn_norm=self._vec(p + "attn_norm.weight"),
                wq=wq, wk=wk, wv=wv,
                wo=self._mat(p + "attn_output.weight", c.n_head * c.head_dim_v, c.n_embd),
                ffn_norm=self._vec(p + "ffn_norm.weight"),
                gate=gate, up=up,
                down=self._mat(p + "ffn_down.weight", c.n_ff, c.n_embd),
                bq=self._vec(p + "attn_q.bias", False), bk=self._vec(p + "attn_k.bias", False),
                bv=self._vec(p + "attn_v.bias", False),
                q_norm=self._vec(p + "attn_q_norm.weight", False),
                k_norm=self._vec(p + "attn_k_norm.weight", False),
                post_attn_norm=self._vec(p + "post_attention_norm.weight", False),
                post_ffn_norm=self._vec(p + "post_ffw_norm.weight", False),
            ))

    # -- forward ----------------------------------------------------------------------
    def new_cache(self, n_ctx: int, dtype="f32", v_dtype=None, flash_attn: bool = False) -> KVCache:
        """A KV cache of ``n_ctx`` positions, keys as ``dtype`` and values as ``v_dtype``
        ('f32' or 'f16'; values default to the keys' type). ``flash_attn``: the CPU layers
        attend as llama.cpp's flash attention does (an F16 cache only)."""
        c = self.config
        cache = KVCache(self.n_cpu_layers, n_ctx, c.n_head_kv, c.head_dim, c.head_dim_v, dtype, v_dtype,
                        flash_attn)
        if self.gpu is not None:
            cache.gpu = self.gpu.new_cache(n_ctx, cache.k.dtype, cache.v.dtype)
        return cache

    def forward(self, tokens: np.ndarray, cache: KVCache, *, all_logits: bool = False,
                observe=None, collect=None) -> np.ndarray:
        """Run `tokens` at positions cache.n_past.. ; returns logits (n, n_vocab) for all
        tokens or (1, n_vocab) for the last one. ``observe(il, x)``, if given, sees the
        hidden state (n, n_embd) entering each CPU layer. ``collect(name, x)``, if given,
        sees the input x (rows, n_in) float32 of every matrix product with the weight's
        GGUF tensor name (the head's too: all rows with ``all_logits``, else the last);
        CPU only: the GPU backend's products are not observable."""
        c = self.config
        if collect is not None and self.gpu is not None:
            raise ValueError("collecting matrix-product inputs needs every layer on the CPU "
                             "(--gpu-layers 0)")
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or tokens.size == 0:
            raise ValueError("forward() needs a non-empty 1-D sequence of token ids")
        if tokens.dtype.kind not in "iu":  # floats, bools, Python ints past int64 (object)
            bad = next((t for t in tokens.tolist() if type(t) is not int or not 0 <= t < c.n_vocab),
                       tokens[0])
            raise ValueError(f"token id {bad!r} is not an integer in the vocabulary "
                             f"(0..{c.n_vocab - 1})")
        if tokens.min() < 0 or tokens.max() >= c.n_vocab:
            bad = int(tokens[(tokens < 0) | (tokens >= c.n_vocab)][0])
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{c.n_vocab - 1})")
        tokens = tokens.astype(np.int64)
        p0, n = cache.n_past, tokens.size
        cache.check_room(n)
        dec, n_cpu = self.decoder, self.n_cpu_layers
        # a CPU layer's product over a large batch runs on the device, as llama.cpp's CUDA
        # backend takes such products (the weight copied there for the one product)
        hook = None if self.gpu is None else self.gpu.host_matmul
        names = self.weight_names
        ops = CpuOps(c, self.rope_factors(cache.n_ctx), hook, OFFLOAD_MIN_BATCH,
                     None if collect is None else (lambda w, x: names[id(w)] and collect(names[id(w)], x)))
        x = dec.embed(ops, self.tok_embd, tokens)                      # (n, n_embd)
        if n_cpu:   # segment 1: layers 0..n_cpu-1 on the CPU
            step = ops.step(np.arange(p0, p0 + n), cache, dec.ropes(0, n_cpu))
            pend = None
            for il in range(n_cpu):
                if observe is not None:
                    x, pend = (x if pend is None else ops.finish(x, pend)), None
                    observe(il, x)
                x, pend = dec.layer(ops, il, self.layers[il], x, pend, step)
            x = ops.finish(x, pend)
        if self.gpu is not None:  # segment 2: the last layers (and maybe the head) on the device
            x = self.gpu.forward(x, p0, cache.gpu, all_logits)
        cache.n_past = p0 + n
        if self.gpu is not None and self.gpu.head:
            return x
        return dec.head(ops, x, None, self.output_norm, self.output, all_logits)  # (n, n_vocab)
