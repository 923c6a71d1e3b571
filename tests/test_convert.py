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
# phi3-long: transformers picks longrope's factors by sequence length, llama.cpp by context size
ARCHS = [a for a in MODELS if a not in ("llama-odd", "gemma3-wide", "phi3-long")]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("ftype", list(BOUNDS))
def test_llama_cpp_logits_match_transformers(arch, ftype, hf_reference, tmp_path):
    folder, ids, ref = hf_reference(arch)
    out = convert(folder, ftype, tmp_path / f"{arch}-{ftype}.gguf").output
    got = llama_oracle.logits(out, ids)
    err = _rel_err(got, ref)
    LOGIT_ERRORS[(arch, ftype)] = err
    bound = BOUNDS[ftype]
    if arch in ("gemma3", "gemma2") and ftype == "F32":
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


# -- what llama.cpp's converter writes for the same tiny models -----------------------------------
# Read from convert_hf_to_gguf.py's own output (the llama.cpp bundled with llama-cpp-python
# 0.3.36, run on these MODELS with --outtype f32, 2026-12-08: gguf-py's GGUFReader, every key
# but general.name and the chat template, each tensor of block 0 standing for every block); the
# weights themselves were equal byte for byte. The converter is not on CI, so its listing is here.
_U, _F, _S, _B = "UINT32", "FLOAT32", "STRING", "BOOL"
_SPM = {"tokenizer.ggml.model": (_S, "llama"), "tokenizer.ggml.pre": (_S, "default"),
        "tokenizer.ggml.add_bos_token": (_B, True), "tokenizer.ggml.add_sep_token": (_B, False),
        "tokenizer.ggml.add_eos_token": (_B, False), "general.type": (_S, "model"),
        "general.file_type": (_U, 0), "general.quantization_version": (_U, 2)}
_PHI3_KEYS = {
    **_SPM, "general.architecture": (_S, "phi3"), "general.size_label": (_S, "1.5M"),
    "phi3.context_length": (_U, 512), "phi3.rope.scaling.original_context_length": (_U, 512),
    "phi3.embedding_length": (_U, 256), "phi3.feed_forward_length": (_U, 512), "phi3.block_count": (_U, 2),
    "phi3.attention.head_count": (_U, 4), "phi3.attention.head_count_kv": (_U, 2),
    "phi3.attention.layer_norm_rms_epsilon": (_F, 1e-05), "phi3.rope.dimension_count": (_U, 64),
    "phi3.rope.freq_base": (_F, 10000.0), "phi3.attention.sliding_window": (_U, 0),
    "tokenizer.ggml.tokens": ("ARRAY", _S, 704), "tokenizer.ggml.scores": ("ARRAY", _F, 704),
    "tokenizer.ggml.token_type": ("ARRAY", "INT32", 704), "tokenizer.ggml.bos_token_id": (_U, 1),
    "tokenizer.ggml.eos_token_id": (_U, 700), "tokenizer.ggml.unknown_token_id": (_U, 0),
    "tokenizer.ggml.padding_token_id": (_U, 700)}
_PHI3_TENSORS = {
    "output.weight": ((256, 704), "F32"), "token_embd.weight": ((256, 704), "F32"),
    "output_norm.weight": ((256,), "F32"), "blk.{i}.attn_norm.weight": ((256,), "F32"),
    "blk.{i}.attn_qkv.weight": ((256, 512), "F32"), "blk.{i}.attn_output.weight": ((256, 256), "F32"),
    "blk.{i}.ffn_norm.weight": ((256,), "F32"), "blk.{i}.ffn_up.weight": ((256, 1024), "F32"),
    "blk.{i}.ffn_down.weight": ((512, 256), "F32")}
LLAMA_CPP_LISTING = {
    "gemma2": ({
        **_SPM, "general.architecture": (_S, "gemma2"), "general.size_label": (_S, "2.5M"),
        "gemma2.context_length": (_U, 512), "gemma2.embedding_length": (_U, 256), "gemma2.block_count": (_U, 4),
        "gemma2.feed_forward_length": (_U, 512), "gemma2.attention.head_count": (_U, 4),
        "gemma2.attention.head_count_kv": (_U, 2), "gemma2.attention.layer_norm_rms_epsilon": (_F, 1e-06),
        "gemma2.attention.key_length": (_U, 64), "gemma2.attention.value_length": (_U, 64),
        "gemma2.attn_logit_softcapping": (_F, 1.5), "gemma2.final_logit_softcapping": (_F, 4.0),
        "gemma2.attention.sliding_window": (_U, 4),
        "tokenizer.ggml.tokens": ("ARRAY", _S, 700), "tokenizer.ggml.scores": ("ARRAY", _F, 700),
        "tokenizer.ggml.token_type": ("ARRAY", "INT32", 700), "tokenizer.ggml.bos_token_id": (_U, 2),
        "tokenizer.ggml.eos_token_id": (_U, 1), "tokenizer.ggml.unknown_token_id": (_U, 3),
        "tokenizer.ggml.padding_token_id": (_U, 0), "tokenizer.ggml.mask_token_id": (_U, 4),
        "tokenizer.ggml.add_space_prefix": (_B, False)}, {
        "token_embd.weight": ((256, 700), "F32"), "output_norm.weight": ((256,), "F32"),
        "blk.{i}.attn_norm.weight": ((256,), "F32"), "blk.{i}.attn_q.weight": ((256, 256), "F32"),
        "blk.{i}.attn_k.weight": ((256, 128), "F32"), "blk.{i}.attn_v.weight": ((256, 128), "F32"),
        "blk.{i}.attn_output.weight": ((256, 256), "F32"), "blk.{i}.post_attention_norm.weight": ((256,), "F32"),
        "blk.{i}.ffn_norm.weight": ((256,), "F32"), "blk.{i}.ffn_gate.weight": ((256, 512), "F32"),
        "blk.{i}.ffn_up.weight": ((256, 512), "F32"), "blk.{i}.ffn_down.weight": ((512, 256), "F32"),
        "blk.{i}.post_ffw_norm.weight": ((256,), "F32")}),
    "phi3": (_PHI3_KEYS, _PHI3_TENSORS),
    "phi3-long": ({
        **_PHI3_KEYS, "phi3.context_length": (_U, 1024), "phi3.rope.scaling.original_context_length": (_U, 128),
        "phi3.rope.scaling.attn_factor": (_F, 1.1952286)}, {
        **_PHI3_TENSORS, "rope_factors_long.weight": ((32,), "F32"), "rope_factors_short.weight": ((32,), "F32")}),
}


def _listing(path) -> tuple[dict, dict]:
    r = gguf.GGUFReader(path)
    kvs = {}
    for f in r.fields.values():
        if f.name.startswith(("GGUF.", "ggforge.")) or f.name in ("general.name", "tokenizer.chat_template"):
            continue
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            kvs[f.name] = ("ARRAY", f.types[-1].name, len(f.data))
        else:
            v = f.contents()
            kvs[f.name] = (f.types[0].name, round(v, 7) if isinstance(v, float) else v)
    n_blocks = kvs[f"{kvs['general.architecture'][1]}.block_count"][1]
    tensors = {t.name: (tuple(int(x) for x in t.shape), t.tensor_type.name) for t in r.tensors}
    return kvs, tensors, n_blocks


@pytest.mark.parametrize("arch", list(LLAMA_CPP_LISTING))
def test_same_keys_and_tensors_as_llama_cpp_converter(arch, tiny_model, tmp_path):
    """Key for key (type and value; arrays by length), tensor for tensor (name, shape, type)."""
    keys, tensors = LLAMA_CPP_LISTING[arch]
    ours, our_tensors, n_blocks = _listing(convert(tiny_model(arch), "f32", tmp_path / "m.gguf").output)
    assert ours == keys
    want = {n.format(i=i): v for n, v in tensors.items() for i in range(n_blocks if "{i}" in n else 1)}
    assert our_tensors == want


def test_phi3_added_tokens_as_llama_cpp_converter(tiny_model, tmp_path):
    """Phi3MiniModel.set_vocab: tokenizer.json's added tokens past the SentencePiece pieces
    are CONTROL with score -1000; <unk>, <s>, </s> too (they are added tokens as well)."""
    out = convert(tiny_model("phi3"), "f32", tmp_path / "m.gguf").output
    with GGUFFile.open(out) as g:
        md = g.metadata
        assert list(md["tokenizer.ggml.tokens"][700:]) == ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>"]
        assert list(md["tokenizer.ggml.token_type"][:3]) == [3, 3, 3]
        assert list(md["tokenizer.ggml.token_type"][698:]) == [1, 1, 3, 3, 3, 3]
        assert list(md["tokenizer.ggml.scores"][700:]) == [-1000.0] * 4


def test_unsupported_architecture_is_one_line_listing_the_supported(tmp_path):
    import json

    from safetensors.numpy import save_file

    from ggforge.formats.errors import UnsupportedModelError

    save_file({"x.weight": np.ones((2, 2), np.float32)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FalconForCausalLM"]}))
    with pytest.raises(UnsupportedModelError) as e:
        convert(tmp_path, "f32", tmp_path / "m.gguf")
    msg = str(e.value)
    assert "\n" not in msg and "FalconForCausalLM" in msg
    for name in ("Gemma2ForCausalLM", "Phi3ForCausalLM", "Gemma3ForCausalLM", "LlamaForCausalLM"):
        assert name in msg


def test_gemma2_lm_head_is_dropped(tiny_model, tmp_path):
    """Gemma2Model.filter_tensors: a checkpoint's lm_head.weight (the tied embedding saved
    twice) is not written; llama.cpp's Gemma 2 loader would refuse an output.weight."""
    from safetensors.numpy import load_file

    src = tiny_model("gemma2")
    emb = load_file(src / "model.safetensors")["model.embed_tokens.weight"]
    with_head = _rewrite_checkpoint(src, tmp_path / "h", lambda k: k, {"lm_head.weight": emb}, lambda c: c)
    a = convert(src, "q8_0", tmp_path / "a.gguf").output
    b = convert(with_head, "q8_0", tmp_path / "b.gguf").output
    with GGUFFile.open(a) as ga, GGUFFile.open(b) as gb:
        assert "output.weight" not in gb.tensors and list(ga.tensors) == list(gb.tensors)
