#!/usr/bin/env python3
"""Train pystdlib-6m, ggforge's embedded demo model, from the running Python's own stdlib.

    python3 scripts/train/train_demo_model.py --out models/pystdlib-6m --minutes 6   # GPU run
    python3 scripts/train/train_demo_model.py --out /tmp/smoke --steps 3            # CPU smoke test

Nothing is downloaded: the text is the standard library of the interpreter that runs this
script (`Lib/**/*.py`, without test/, tests/, idlelib/, lib2to3/, site-packages) and the
English prose of `pydoc_data/topics.py` (one document per topic). The model is a real
`LlamaForCausalLM` (hidden 256, 6 layers, 4 heads, 2 KV heads, intermediate 768, tied
embeddings, 5.77M parameters, 11.5 MB in BF16) with a Llama-3-style byte-level BPE tokenizer
of 4096 entries, trained here with `tokenizers` the way tests/tokenizer_factory.py builds
its "llama3-bpe" kind (Llama 3 split regex + ByteLevel, ignore_merges, Llama 3 special
tokens, chat template), so that `quantize FOLDER f32` names its pre-tokenizer llama-bpe.

Splits, by a hash of a file's stdlib-relative path (topics: of "topic:" + key), so that the
same names are held out on every Python version:

    crc32(name) % 20 == 0   test  (the held-out set: perplexity / KL measurements)
    crc32(name) % 20 == 1   validation (picks the run and the checkpoint)
    otherwise               training (tokenizer and model)

Neither test nor validation text reaches the tokenizer or the model's training batches.

The corpus is small (2.5M training tokens on Python 3.12), so the number of passes matters
more than the minutes (past about 7 passes the model overfits): the script trains one cosine
schedule per entry of --epochs (shortest first, each from the same initialization), keeps
the state with the lowest validation loss, stops when a longer schedule validates worse than
a shorter one or when the next would not finish inside --minutes, then saves that state in
BF16 and reports train / validation / test loss of the saved file, reloaded with
`LlamaForCausalLM.from_pretrained`.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

VOCAB = 4096
CTX = 512
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__"}
TOPICS_FILE = "pydoc_data/topics.py"
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{% for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
MODEL_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "generation_config.json"}


def log(*args) -> None:
    print(*args, flush=True)


# -- corpus ---------------------------------------------------------------------------------

def split_of(name: str) -> str:
    r = zlib.crc32(name.encode("utf-8")) % 20
    return "test" if r == 0 else "val" if r == 1 else "train"


def collect_corpus() -> tuple[dict[str, list[tuple[str, str]]], Path]:
    """{split: [(name, text)]} from this interpreter's stdlib, in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: dict[str, list[tuple[str, str]]] = {"train": [], "val": [], "test": []}
    skipped = []
    for rel in sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py") if p.is_file()):
        if SKIP_DIRS & set(rel.split("/")[:-1]) or rel == TOPICS_FILE:
            continue
        try:
            text = (root / rel).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(rel)
            continue
        docs[split_of(rel)].append((rel, text))
    from pydoc_data.topics import topics
    for key in sorted(topics):
        name = "topic:" + key
        docs[split_of(name)].append((name, topics[key]))
    if skipped:
        log(f"skipped (not UTF-8): {', '.join(skipped)}")
    return docs, root


# -- tokenizer ------------------------------------------------------------------------------

def train_tokenizer(texts: list[str], folder: Path):
    """Llama-3-style byte-level BPE with VOCAB entries in all (specials last), as
    tests/tokenizer_factory.py's llama3-bpe; writes the three tokenizer files."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors, trainers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_REGEX), "isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - len(LLAMA3_SPECIALS), special_tokens=[],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    spec = json.loads(tok.to_str())
    spec["model"]["ignore_merges"] = True  # Llama 3: a pre-token in the vocabulary is taken whole
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in LLAMA3_SPECIALS])
    if tok.get_vocab_size() != VOCAB:
        raise SystemExit(f"tokenizer has {tok.get_vocab_size()} entries, not {VOCAB}")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                      special_tokens=[(BOS, tok.token_to_id(BOS))])])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))

    def added(content: str, special: bool = True) -> dict:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": special}

    decoder = {str(i): added(t.content, t.special) for i, t in sorted(tok.get_added_tokens_decoder().items())}
    # a base model: documents end with <|end_of_text|>; the chat template is Llama 3's
    config = {"added_tokens_decoder": decoder, "bos_token": BOS, "eos_token": EOS,
              "chat_template": LLAMA3_TEMPLATE, "clean_up_tokenization_spaces": True,
              "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 1024,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    for name, obj in [("tokenizer_config.json", config),
                      ("special_tokens_map.json", {"bos_token": added(BOS), "eos_token": added(EOS)})]:
        (folder / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return tok


def token_stream(tok, texts: list[str]) -> torch.Tensor:
    """Documents as <|begin_of_text|> text <|end_of_text|>, concatenated."""
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.append(bos)
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


# -- model ----------------------------------------------------------------------------------

def make_model(bos_id: int, eos_id: int, seed: int):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, hidden_act="silu",
                      max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=True, bos_token_id=bos_id, eos_token_id=eos_id,
                      attention_bias=False, mlp_bias=False, initializer_range=0.02)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id)
    return model


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def lm_loss(model, x: torch.Tensor, device: torch.device, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross entropy of windows x (batch, ctx + 1), in float32."""
    with autocast(device):
        logits = model(input_ids=x[:, :-1]).logits  # (batch, ctx, vocab)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                           reduction=reduction)


@torch.no_grad()
def evaluate(model, stream: torch.Tensor, device: torch.device, batch: int, max_windows: int = 0) -> float:
    """Mean loss over non-overlapping CTX windows of `stream` (evenly spaced subset if
    max_windows); the tail shorter than a window is left out."""
    n = (len(stream) - 1) // CTX
    starts = torch.arange(n) * CTX
    if max_windows and n > max_windows:
        starts = starts[torch.linspace(0, n - 1, max_windows).long()]
    model.eval()
    total, count = 0.0, 0
    for chunk in starts.split(batch):
        x = stream[chunk[:, None] + torch.arange(CTX + 1)].to(device)
        total += lm_loss(model, x, device, reduction="sum").item()
        count += x[:, 1:].numel()
    model.train()
    return total / max(count, 1)


def batches(stream: torch.Tensor, batch: int, gen: torch.Generator):
    """Endless shuffled epochs of non-overlapping windows, each epoch at a random offset."""
    while True:
        off = int(torch.randint(0, CTX, (1,), generator=gen))
        starts = torch.arange(off, len(stream) - CTX - 1, CTX)
        starts = starts[torch.randperm(len(starts), generator=gen)]
        for i in range(0, len(starts) - batch + 1, batch):
            yield starts[i:i + batch]


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def train_one(args, train: torch.Tensor, val: torch.Tensor, steps: int, ids: tuple[int, int],
              device: torch.device, deadline: float) -> dict:
    """One cosine schedule of `steps` steps; returns the lowest-validation state and its record."""
    model = make_model(*ids, seed=args.seed).to(device)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
    warmup = max(1, min(300, steps // 10))
    eval_every = max(1, steps // 25)
    gen = torch.Generator().manual_seed(args.seed)
    it = batches(train, args.batch, gen)
    train_dev = train.to(device)
    offsets = torch.arange(CTX + 1, device=device)
    best = {"val": float("inf")}
    run_loss, t0, stopped = None, time.monotonic(), False
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, args.lr, warmup)
        x = train_dev[next(it).to(device)[:, None] + offsets]
        loss = lm_loss(model, x, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % eval_every == 0 or step + 1 == steps or time.monotonic() > deadline:
            lv = run_loss = loss.item()  # this step's batch loss
            v = evaluate(model, val, device, args.batch, args.eval_windows)
            if v < best["val"]:
                best = {"val": v, "step": step + 1,
                        "state": {k: t.detach().clone() for k, t in model.state_dict().items()}}
            log(f"  step {step + 1:6d}/{steps}  lr {opt.param_groups[0]['lr']:.2e}  train {lv:.4f}  "
                f"val {v:.4f}  {time.monotonic() - t0:7.1f}s")
            if time.monotonic() > deadline and step + 1 < steps:
                log("  deadline reached: stopping this schedule early")
                stopped = True
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.monotonic() - t0
    done = step + 1
    return {"model": model, "best": best, "steps": steps, "steps_done": done, "seconds": dt,
            "tokens": done * args.batch * CTX, "last_train_batch_loss": run_loss, "stopped": stopped}


# -- main -----------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="model folder to write")
    ap.add_argument("--minutes", type=float, default=7.0, help="wall budget for the training schedules")
    ap.add_argument("--epochs", default="6,16,40,100,250",
                    help="passes over the training tokens, one schedule each, shortest first")
    ap.add_argument("--steps", type=int, default=0, help="one schedule of this many steps (smoke tests)")
    ap.add_argument("--batch", type=int, default=64, help="windows of 512 tokens per step")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-windows", type=int, default=0,
                    help="at most this many windows per validation/test evaluation (0: all; smoke tests)")
    ap.add_argument("--json", type=Path, help="write the numbers (and split file names) here")
    args = ap.parse_args()
    t_start = time.monotonic()
    import tokenizers
    import transformers
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu"
    log(f"python {platform.python_version()} ({sys.executable}), torch {torch.__version__}, "
        f"transformers {transformers.__version__}, tokenizers {tokenizers.__version__}, device {gpu}")

    docs, root = collect_corpus()
    for s in ("train", "val", "test"):
        n_topics = sum(n.startswith("topic:") for n, _ in docs[s])
        log(f"{s}: {len(docs[s]) - n_topics} files + {n_topics} topics, "
            f"{sum(len(t.encode()) for _, t in docs[s])} bytes")
    t = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer([t for _, t in docs["train"]], args.out)
    streams = {s: token_stream(tok, [t for _, t in docs[s]]) for s in docs}
    test_code = token_stream(tok, [t for n, t in docs["test"] if not n.startswith("topic:")])
    test_prose = token_stream(tok, [t for n, t in docs["test"] if n.startswith("topic:")])
    n_bytes = {s: sum(len(t.encode()) for _, t in docs[s]) for s in docs}
    log(f"tokenizer trained in {time.monotonic() - t:.1f}s; tokens: " +
        ", ".join(f"{s} {len(v)}" for s, v in streams.items()) +
        f"; {n_bytes['train'] / len(streams['train']):.2f} bytes/token (train)")
    ids = (tok.token_to_id(BOS), tok.token_to_id(EOS))

    tokens_per_step = args.batch * CTX
    plan = ([("steps", args.steps)] if args.steps else
            [(f"{e}ep", max(1, round(float(e) * len(streams["train"]) / tokens_per_step)))
             for e in args.epochs.split(",")])
    t_train = time.monotonic()
    deadline = t_train + args.minutes * 60
    runs, chosen, tok_per_s = [], None, None
    for name, steps in plan:
        if tok_per_s is not None:
            need = steps * tokens_per_step / tok_per_s * 1.05
            if time.monotonic() + need > deadline:
                log(f"schedule {name} ({steps} steps) needs ~{need:.0f}s, more than the budget left: skipped")
                break
        log(f"schedule {name}: {steps} steps of {tokens_per_step} tokens, lr {args.lr}, wd {args.wd}")
        r = train_one(args, streams["train"], streams["val"], steps, ids, device, deadline)
        tok_per_s = r["tokens"] / r["seconds"]
        rec = {"name": name, "steps": steps, "steps_done": r["steps_done"], "seconds": round(r["seconds"], 1),
               "tokens": r["tokens"], "tokens_per_s": round(tok_per_s), "best_val": r["best"]["val"],
               "best_step": r["best"]["step"], "stopped_at_deadline": r["stopped"]}
        runs.append(rec)
        log(f"schedule {name}: best val {rec['best_val']:.4f} at step {rec['best_step']}, "
            f"{rec['seconds']}s, {tok_per_s:,.0f} tokens/s")
        if chosen is None or rec["best_val"] < chosen[0]["best_val"]:
            chosen = (rec, r["best"]["state"], r["model"])
        else:
            log("longer schedule validated worse: stopping the search")
            break
        if r["stopped"]:
            break
    train_seconds = time.monotonic() - t_train

    rec, state, model = chosen
    model.load_state_dict(state)
    w = args.eval_windows
    fp32_test = evaluate(model, streams["test"], device, args.batch, w)
    model.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    for f in args.out.iterdir():  # only the files a Hugging Face model folder needs
        if f.name not in MODEL_FILES:
            f.unlink() if f.is_file() else None
    from transformers import LlamaForCausalLM
    saved = LlamaForCausalLM.from_pretrained(args.out, dtype=torch.float32).to(device)
    n_params = sum(p.numel() for p in saved.parameters())
    res = {"train": evaluate(saved, streams["train"], device, args.batch, w or 2048),
           "val": evaluate(saved, streams["val"], device, args.batch, w),
           "test": evaluate(saved, streams["test"], device, args.batch, w),
           "test_code": evaluate(saved, test_code, device, args.batch, w),
           "test_prose": evaluate(saved, test_prose, device, args.batch, w)}
    bpb = res["test"] * len(streams["test"]) / (math.log(2) * n_bytes["test"])
    log(f"chosen: schedule {rec['name']} at step {rec['best_step']} of {rec['steps']} "
        f"({rec['best_step'] * tokens_per_step:,} tokens seen)")
    log(f"saved BF16 model ({n_params:,} parameters, "
        f"{(args.out / 'model.safetensors').stat().st_size:,} bytes) to {args.out}")
    for s, v in res.items():
        log(f"{s:10s} loss {v:.4f}  ppl {math.exp(v):8.3f}")
    log(f"test (fp32 weights before BF16 rounding) loss {fp32_test:.4f}; test {bpb:.4f} bits/byte")
    total = time.monotonic() - t_start
    log(f"training {train_seconds:.1f}s, whole script {total:.1f}s")
    if args.json:
        out = {"python": platform.python_version(), "stdlib": str(root), "torch": torch.__version__,
               "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
               "device": gpu, "args": {k: str(v) for k, v in vars(args).items()},
               "tokens": {s: len(v) for s, v in streams.items()}, "bytes": n_bytes,
               "tokens_test_code": len(test_code), "tokens_test_prose": len(test_prose),
               "runs": runs, "chosen": rec, "tokens_seen": rec["best_step"] * tokens_per_step,
               "loss": res, "ppl": {s: math.exp(v) for s, v in res.items()}, "test_fp32_loss": fp32_test,
               "test_bits_per_byte": bpb, "parameters": n_params, "train_seconds": train_seconds,
               "script_seconds": total, "heldout_test": [n for n, _ in docs["test"]],
               "heldout_val": [n for n, _ in docs["val"]]}
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
