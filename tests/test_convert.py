"""End to end: tiny HF models of every architecture -> GGUF -> llama.cpp, against transformers."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

import llama_oracle
from conftest import LOGIT_ERRORS
from model_factory import MODELS, hf_logits, read_config
from ggforge.convert.pipeline import convert
from ggforge.formats.gguf_reader import GGUFFile
from ggforge.formats.safetensors import SafetensorsFile

TEXT = "Once upon a time, there was a tiny model that 42 people liked."
# relative logit error bounds per file type (float32 rounding for F32; quantization noise otherwise)
BOUNDS = {"F32": 1e-4, "F16": 5e-3, "BF16": 3e-2, "Q8_0": 6e-2,
          "Q5_1": 0.3, "Q5_0": 0.3, "Q4_1": 0.5, "Q4_0": 0.5}


def _ids(folder) -> list[int]:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tok(TEXT)["input_ids"]
    assert len(ids) > 8  # longer than Gemma's tiny sliding window
    return ids


def _rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    """Relative RMS error of the logits: ||got - ref|| / ||ref||."""
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def hf_reference(tiny_model):
    cache = {}

    def get(arch: str):
        if arch not in cache:
            folder = tiny_model(arch)
            ids = _ids(folder)
            cache[arch] = (folder, ids, hf_logits(folder, ids))
        return cache[arch]
    return get


# llama-odd has its own tests; gemma3-wide is gemma3 at real widths, for memory measurements
ARCHS = [a for a in MODELS if a not in ("llama-odd", "gemma3-wide")]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("ftype", list(BOUNDS))
def test_llama_cpp_logits_match_transformers(arch, ftype, hf_reference, tmp_path):
    folder, ids, ref = hf_reference(arch)
    out = convert(folder, ftype, tmp_path / f"{arch}-{ftype}.gguf").output
    got = llama_oracle.logits(out, ids)
    err = _rel_err(got, ref)
    LOGIT_ERRORS[(arch, ftype)] = err
    bound = BOUNDS[ftype]
    if arch == "gemma3" and ftype == "F32":
        bound = 1e-3  # ggml's CPU GELU looks x up in a table indexed by its fp16 value
    assert err < bound, f"{arch} {ftype}: relative logit error {err:.3g}"
    if ftype in ("F32", "F16"):  # the greedy choice survives float rounding
        assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("arch", ARCHS)
def test_metadata_and_tensor_types(arch, tiny_model, tmp_path):
    folder = tiny_model(arch)
    out = convert(folder, "q8_0", tmp_path / "m.gguf").output
    with GGUFFile.open(out) as g:
        md = g.metadata
        a = md["general.architecture"]
        assert md["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
        assert md["general.quantization_version"] == gguf.GGML_QUANT_VERSION
        assert md["general.name"] == folder.name and md["general.size_label"]
        assert md[f"{a}.block_count"] == MODELS[arch].overrides.get("num_hidden_layers", 2)
        assert len(md["tokenizer.ggml.tokens"]) == md.get(f"{a}.vocab_size", len(md["tokenizer.ggml.tokens"]))
        for t in g.tensors.values():
            if len(t.dims) == 1:
                assert t.type_name == "F32", t.name
            else:
                assert t.type_name == "Q8_0", t.name


def test_bf16_checkpoint_bytes_and_logits(tiny_model, tmp_path):
    """A BF16 checkpoint converted to BF16 keeps its exact bits (q/k permuted as llama.cpp does)."""
    folder = tiny_model("llama3", "bfloat16")
    out = convert(folder, "bf16", tmp_path / "b.gguf").output
    with SafetensorsFile.open(folder / "model.safetensors") as st, GGUFFile.open(out) as g:
        src = st.read("model.layers.0.mlp.down_proj.weight")       # uint16 bits
        assert np.array_equal(g.array("blk.0.ffn_down.weight"), src)
        src_q = st.read("model.layers.1.self_attn.q_proj.weight").reshape(4, 2, 32, 256)
        permuted = src_q.swapaxes(1, 2).reshape(256, 256)             # llama.cpp's rotary layout
        assert np.array_equal(g.array("blk.1.attn_q.weight"), permuted)
    ids = _ids(folder)
    f32 = convert(folder, "f32", tmp_path / "f.gguf").output
    assert _rel_err(llama_oracle.logits(f32, ids), hf_logits(folder, ids)) < BOUNDS["F32"]


def test_sharded_checkpoint_equals_single_file(tmp_path):
    from model_factory import build_model

    single = build_model("qwen2", tmp_path / "single", seed=3)
    sharded = build_model("qwen2", tmp_path / "sharded", seed=3, max_shard_size="1MB")
    assert (sharded / "model.safetensors.index.json").is_file()
    a = convert(single, "q4_0", tmp_path / "a.gguf").output
    b = convert(sharded / "model.safetensors.index.json", "q4_0", tmp_path / "b.gguf").output
    c = convert(sharded, "q4_0", tmp_path / "c.gguf").output
    with GGUFFile.open(a) as ga, GGUFFile.open(b) as gb, GGUFFile.open(c) as gc:
        assert sorted(ga.tensors) == sorted(gb.tensors) == sorted(gc.tensors)
        for name in ga.tensors:
            assert np.array_equal(ga.raw(name), gb.raw(name)), name
            assert np.array_equal(ga.raw(name), gc.raw(name)), name


def _rewrite_checkpoint(src, dst, rename, extra, config_edit):
    """Copy a tiny model folder, renaming its tensors and editing config.json."""
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    tensors = {rename(k): v for k, v in load_file(src / "model.safetensors").items()}
    tensors.update(extra)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config_edit(cfg)))
    return dst


@pytest.mark.parametrize("prefix", ["model.language_model.", "language_model.model."])
def test_gemma3_text_model_inside_multimodal_checkpoint(prefix, tiny_model, tmp_path):
    """Gemma3ForConditionalGeneration: the text model converts as Gemma3ForCausalLM does;
    the vision tower and projector are left out."""
    src = tiny_model("gemma3")
    vision = {"model.vision_tower.vision_model.embeddings.patch_embedding.weight": np.ones((8, 3, 2, 2), np.float32),
              "model.multi_modal_projector.mm_input_projection_weight": np.ones((16, 256), np.float32)}

    def config(cfg):
        return {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
                "text_config": {**cfg, "model_type": "gemma3_text"},
                "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 16}}

    mm = _rewrite_checkpoint(src, tmp_path / "mm", lambda k: k.replace("model.", prefix, 1), vision, config)
    a = convert(src, "q8_0", tmp_path / "a.gguf").output
    b = convert(mm, "q8_0", tmp_path / "b.gguf").output
    with GGUFFile.open(a) as ga, GGUFFile.open(b) as gb:
        assert list(ga.tensors) == list(gb.tensors)
        for name in ga.tensors:
            assert np.array_equal(ga.raw(name), gb.raw(name)), name


def test_gemma3_unused_embedding_rows_are_dropped(tiny_model, tmp_path):
    """Like llama.cpp's converter: token_embd keeps one row per token of the vocabulary."""
    src = tiny_model("gemma3")
    n_vocab = read_config(src)["vocab_size"]

    def pad(k):
        return k

    from safetensors.numpy import load_file
    emb = load_file(src / "model.safetensors")["model.embed_tokens.weight"]
    extra = {"model.embed_tokens.weight": np.concatenate([emb, np.ones((64, emb.shape[1]), np.float32)])}
    big = _rewrite_checkpoint(src, tmp_path / "big", pad, extra, lambda c: c)
    out = convert(big, "f32", tmp_path / "o.gguf").output
    with GGUFFile.open(out) as g:
        assert g.tensors["token_embd.weight"].shape == (n_vocab, emb.shape[1])
        assert np.array_equal(g.array("token_embd.weight"), emb)
