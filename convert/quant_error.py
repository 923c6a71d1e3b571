"""How much each tensor lost in quantization, measured while it is written.

    errors = TensorErrors()
    errors.add(t, rows, out, weights)      # each chunk: float32 rows, their quantized bytes
    errors.rows()                          # [(name, type, relative RMS error)], worst first

The relative RMS error of a tensor is sqrt(sum w (x - q)^2 / sum w x^2) over all its
values, x the source value, q the value the quantized block decodes to, and w the
importance of x's column (the imatrix entry the quantizer weighed its rounding by; 1 for
every column without one). It is the figure a quantizer minimises, per tensor, which is
where a mix's bits go wrong; what it does to the model's outputs is the KL divergence
of the quality report (convert/report.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ggforge.formats.quants import dequantize


@dataclass
class TensorError:
    name: str
    type_name: str
    weighted: bool         # importance-weighted (an imatrix entry was used)
    err: float = 0.0       # sum w (x - q)^2
    ref: float = 0.0       # sum w x^2

    @property
    def rel_rms(self) -> float:
        return float(np.sqrt(self.err / self.ref)) if self.ref > 0 else 0.0


class TensorErrors:
    """Per-tensor quantization error of a conversion (quantized tensors only)."""

    def __init__(self) -> None:
        self._by_name: dict[str, TensorError] = {}

    def add(self, t, rows: np.ndarray, out: np.ndarray, weights: np.ndarray | None) -> None:
        """One chunk of tensor ``t``: rows (n, n_per_row) float32 and their bytes ``out``."""
        if t.qtype.block_size == 1 or rows.size == 0:   # float types: nothing rounded to blocks
            return
        e = self._by_name.get(t.name)
        if e is None:
            e = self._by_name[t.name] = TensorError(t.name, t.qtype.name, weights is not None)
        q = dequantize(out, t.qtype.ggml_type, rows.shape)            # (n, n_per_row)
        d2 = np.square(rows - q, dtype=np.float64)
        x2 = np.square(rows, dtype=np.float64)
        if weights is not None:
            w = np.asarray(weights, np.float64).reshape(1, -1)
            e.err += float((d2 * w).sum())
            e.ref += float((x2 * w).sum())
        else:
            e.err += float(d2.sum())
            e.ref += float(x2.sum())

    def rows(self) -> list[TensorError]:
        """Every quantized tensor, the worst (largest relative RMS error) first."""
        return sorted(self._by_name.values(), key=lambda e: -e.rel_rms)

    def __len__(self) -> int:
        return len(self._by_name)
