"""The offload plan as tables (``ggforge inspect --plan``)."""
from __future__ import annotations

from ggforge.runtime.placement import UBATCH, Plan
from ggforge.tools.table import format_table, human_bytes as hb


def render_plan(plan: Plan) -> str:
    """Per-layer placement, the KV formula, and the GPU and CPU totals."""
    rows = []
    for L in plan.layers:
        rows.append([f"blk.{L.index}", "swa" if L.swa else "full", L.device, hb(L.weights),
                     L.cells, hb(L.kv)])
    rows.append(["token_embd", "", "cpu", hb(plan.embd_bytes), "", ""])
    rows.append(["output", "", "gpu" if plan.head_on_gpu else "cpu", hb(plan.head_bytes), "", ""])
    out = [format_table(["layer", "attention", "device", "weights", "KV cells", "KV"], rows), ""]
    out.append(f"gpu layers: {plan.gpu_layers} of {plan.n_layer + 1} "
               f"(the last {min(plan.gpu_layers, plan.n_layer)} repeating layers"
               f"{' + output' if plan.head_on_gpu else ''}); context {plan.n_ctx}")
    out.append(f"KV cache ({plan.kv_types}): " + "; ".join(plan.kv_formula))
    gpu = [["weights", hb(plan.gpu_weights)], ["KV cache", hb(plan.gpu_kv)],
           ["scratch (one batch of %d tokens)" % UBATCH, hb(plan.scratch if plan.gpu_layers else 0)],
           ["margin", hb(plan.margin if plan.gpu_layers else 0)],
           ["total", hb(plan.gpu_total)]]
    if plan.device_free is not None:
        gpu.append(["device free", hb(plan.device_free)])
        gpu.append(["fits", "yes" if plan.fits else "NO"])
    cpu = [["weights (mapped from the file)", hb(sum(L.weights for L in plan.layers if L.device == "cpu")
                                                 + plan.embd_bytes
                                                 + (0 if plan.head_on_gpu else plan.head_bytes))],
           ["KV cache", hb(plan.cpu_kv)]]
    out += ["", format_table(["GPU", "bytes"], gpu), "", format_table(["CPU", "bytes"], cpu)]
    return "\n".join(out)

