"""One-step calibrated quantization: the importance matrix of a source, from its own weights.

    cal = calibrate("./SmolLM2-135M")                     # the default text, 512-token chunks
    convert("./SmolLM2-135M", "Q4_K_M", imatrix=cal.imatrix,
            options=MixOptions(has_imatrix=True))
    cal.save("imatrix.gguf")                              # only if the file is wanted

What `quantize SRC q4 --calibrate [FILE]` does, as llama.cpp's three steps would
(convert_hf_to_gguf.py --outtype auto, llama-imatrix, llama-quantize --imatrix):

1. the source (a Hugging Face folder, .safetensors file or shard index) is converted to a
   temporary GGUF at its own precision: BF16 weights give a BF16 file, F16 an F16 file,
   anything else F32 (``precision=`` overrides). A GGUF source with float weights is used
   as it is. The runtime computes from F32/F16/BF16 weights in the mapped file, so the
   memory this step adds is the mapping (file-backed pages the kernel can drop), not a
   second copy of the model in RAM; the conversion itself streams a few row chunks;
2. the importance matrix over the calibration text is computed exactly as `ggforge
   imatrix` computes it (runtime/imatrix.py: the text tokenized whole, cut into chunks of
   ``n_ctx`` tokens each starting with BOS, every dense product's input of the layers
   collected), on the CPU with llama-imatrix's defaults (an F16 KV cache, flash attention).
   As llama-imatrix, it needs at least two
   chunks: a shorter text is one error naming the text, its token count and ``n_ctx``,
   raised before any tensor is converted;
3. the temporary folder (in ``workdir``: give the output's folder, so that the file lies
   on its filesystem and not in a RAM-backed /tmp) is removed on return, on error and on
   Ctrl-C.

The default text (convert/calibration/default.txt, see the README there) was written for
this project: about 30 KB of English prose on several topics, shorter passages in German,
French, Spanish, Italian, Portuguese, Russian, Chinese, Japanese and Korean, source code
(Python, C, JavaScript, SQL, shell), Markdown, JSON, numbers and tables, and a chat-style
dialogue, so that the matrix sees the kinds of activations a model meets in use.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ggforge.formats.errors import FormatError
from ggforge.formats.imatrix_writer import ImatrixData, write_imatrix

log = logging.getLogger(__name__)

DEFAULT_TEXT = Path(__file__).resolve().parent / "calibration" / "default.txt"
DEFAULT_DATASET = "ggforge:calibration/default.txt"   # imatrix.datasets for the default text
DEFAULT_CTX = 512                                      # llama-imatrix's -c default
_FLOATS = ("F32", "F16", "BF16")

# progress(stage, done, total): stage "convert" counts weights written (of the model's
# parameter count), stage "imatrix" counts chunks evaluated
Progress = Callable[[str, int, int], None]


@dataclass
class Calibration:
    """An importance matrix computed from a source's own weights.

    ``imatrix``: tensor name -> float32 mean squared input activation per column, what
    ``convert(imatrix=)`` takes (the values llama-quantize reads from the file);
    ``data``: the raw sums and counts (``save`` writes them as llama-imatrix's file);
    ``dataset`` / ``sha256``: the text's name (recorded in imatrix.datasets) and the
    SHA-256 of its bytes; ``n_chunks`` x ``n_ctx``: what was evaluated, of ``n_tokens``;
    ``precision``: the weights' type it was computed with; ``ppl``: the source's
    perplexity over the chunks' second halves, as llama-imatrix prints it."""

    imatrix: dict[str, np.ndarray]
    data: ImatrixData
    dataset: str
    sha256: str
    n_chunks: int
    n_ctx: int
    n_tokens: int
    precision: str
    ppl: float | None = None
    ppl_error: float | None = None

    def save(self, path: str | Path, fmt: str = "gguf") -> Path:
        """Write the importance matrix file ('gguf', or llama.cpp's legacy 'dat')."""
        return write_imatrix(self.data, Path(path), fmt)


def calibrate(source: str | Path, text: str | Path | None = None, *, n_ctx: int = DEFAULT_CTX,
              n_chunks: int | None = None, workdir: str | Path | None = None,
              progress: Progress | None = None, precision: str | None = None,
              cache_types: tuple[str, str] = ("f16", "f16"), flash_attn: str = "auto") -> Calibration:
    """The importance matrix of ``source`` over the text file ``text`` (None: the default
    text), computed as `ggforge imatrix SOURCE -f TEXT -c N_CTX --chunks N_CHUNKS` does.

    ``n_chunks``: evaluate at most that many chunks (None: all of them). ``workdir``: where
    the temporary GGUF is written (None: the system's temporary folder). ``precision``:
    'F32', 'F16' or 'BF16' for the temporary file (None: the source's own, see the module
    docstring); ignored for a GGUF source, which is used as it is. ``cache_types`` and
    ``flash_attn``: the KV cache and attention arithmetic, llama-imatrix's defaults (an F16
    cache, flash attention on the CPU); ("f32", "f32") and "off" give its sums with
    -ctk f32 -ctv f32 -fa off."""
    from ggforge.runtime.generate import load
    from ggforge.runtime.imatrix import MIN_ROWS, compute_imatrix, make_chunks, read_text, text_tokens

    if n_ctx < MIN_ROWS:
        raise ValueError(f"calibration context {n_ctx} is below {MIN_ROWS}: llama-imatrix collects "
                         f"no product of fewer than {MIN_ROWS} rows")
    if n_chunks is not None and n_chunks < 1:
        raise ValueError(f"calibration: {n_chunks} chunks leave nothing to evaluate (None: all)")
    path = DEFAULT_TEXT if text is None else Path(text)
    dataset = DEFAULT_DATASET if text is None else str(text)
    raw = read_text(path)        # a missing text fails before any conversion starts
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    counted: dict[str, list[int]] = {}

    def check(tokenizer) -> None:
        ids = text_tokens(tokenizer, raw)
        if len(ids) < 2 * n_ctx:
            raise ValueError(f"{dataset}: the calibration text tokenizes to {len(ids)} tokens; "
                             f"chunks of {n_ctx} need at least {2 * n_ctx} (two chunks, as "
                             "llama-imatrix); give a longer text or a smaller context")
        counted["ids"] = ids

    with _float_gguf(source, workdir, precision, check, progress) as (gguf, ftype):
        with load(gguf, n_ctx=n_ctx, cache_type_k=cache_types[0], cache_type_v=cache_types[1],
                  flash_attn=flash_attn) as lm:
            tok = lm.tokenizer
            if "ids" not in counted:          # a GGUF source: its tokenizer is the file's
                check(tok)
            ids = counted["ids"]
            n_train = lm.model.config.n_ctx_train
            if n_train and n_ctx > n_train:   # llama.cpp runs on, with the same warning
                log.warning("calibration context %d exceeds the model's training context %d",
                            n_ctx, n_train)
            chunks = make_chunks(ids, n_ctx, n_chunks=-1 if n_chunks is None else n_chunks,
                                 bos=tok.bos_id if tok.add_bos else None, what=dataset)
            total = len(chunks)
            step = None if progress is None else (lambda i, _ppl: progress("imatrix", i + 1, total))
            result = compute_imatrix(lm.model, chunks, dataset=dataset, progress=step,
                                     cache_types=cache_types, flash_attn=lm.flash_attn)
    data = result.data
    log.info("calibration: %d chunks of %d tokens of %s (%d tokens), %d entries, %s weights",
             result.n_chunks, n_ctx, dataset, len(ids), len(data.entries), ftype)
    return Calibration(imatrix={name: e.means() for name, e in data.entries.items()}, data=data,
                       dataset=dataset, sha256=sha256, n_chunks=result.n_chunks, n_ctx=n_ctx,
                       n_tokens=len(ids), precision=ftype, ppl=result.ppl,
                       ppl_error=result.ppl_error)


def source_precision(source: str | Path) -> str:
    """The type a Hugging Face checkpoint's matrices keep losslessly: 'BF16' or 'F16' when
    every 2-D tensor has that dtype, else 'F32'."""
    from ggforge.formats.checkpoint import Checkpoint

    with Checkpoint.open(source) as ckpt:
        dtypes = {e.dtype for e in ckpt.tensors.values() if len(e.shape) == 2}
    return dtypes.pop() if dtypes in ({"BF16"}, {"F16"}) else "F32"


def _is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _check_float_gguf(path: Path) -> str:
    """A GGUF source's weight type ('F32' when mixed); refuses quantized weights."""
    from ggforge.formats.gguf_reader import GGUFFile

    with GGUFFile.open(path) as g:
        if "general.architecture" not in g.metadata:
            raise FormatError(f"{path}: not a model: the GGUF has no general.architecture")
        types = {}
        for name, t in g.tensors.items():
            if len(t.dims) >= 2:
                types.setdefault(t.type_name, name)
    bad = [(ty, name) for ty, name in types.items() if ty not in _FLOATS]
    if bad:
        ty, name = bad[0]
        raise FormatError(f"{path}: tensor {name!r} is {ty}: calibration needs the unquantized "
                          "weights (an F32, F16 or BF16 GGUF, or the Hugging Face model)")
    return types.popitem()[0] if len(types) == 1 else "F32"


@contextlib.contextmanager
def _float_gguf(source: str | Path, workdir: str | Path | None, precision: str | None,
                check: Callable, progress: Progress | None) -> Iterator[tuple[Path, str]]:
    """(a GGUF of the source's unquantized weights, its type), converted into a temporary
    folder of ``workdir`` when the source is a Hugging Face checkpoint; the folder is
    removed when the block ends, however it ends. ``check(tokenizer)`` runs on the
    planned file's tokenizer before any tensor is written."""
    from ggforge.convert.pipeline import convert
    from ggforge.runtime.tokenizer import Tokenizer

    path = Path(source)
    if _is_gguf(path):
        yield path, _check_float_gguf(path)
        return
    if precision is not None and precision.upper() not in _FLOATS:
        raise ValueError(f"calibration precision {precision!r}: choose one of {', '.join(_FLOATS)}")
    ftype = precision.upper() if precision else source_precision(path)
    done = [0, 0]

    def on_plan(plan) -> None:
        check(Tokenizer.from_metadata({kv.key: kv.value for kv in plan.metadata}))
        done[1] = plan.n_params

    def step(_t, n: int) -> None:
        done[0] += n
        progress("convert", done[0], done[1])

    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ggforge-calibrate-", dir=workdir) as tmp:
        log.info("calibration: converting %s to a temporary %s GGUF in %s", source, ftype, tmp)
        result = convert(path, ftype, Path(tmp) / f"calibrate-{ftype}.gguf", on_plan=on_plan,
                         progress=None if progress is None else step)
        yield result.output, ftype


__all__ = ["Calibration", "DEFAULT_CTX", "DEFAULT_DATASET", "DEFAULT_TEXT", "calibrate",
           "source_precision"]
