"""PyTorch eager reference of PALM's architecture, for `palm bench`'s side-by-side numbers.

The same network as ModelScope's PalmForTextGeneration (palm-reference.md §2), written for
speed the way a PyTorch user would: a post-LN BERT encoder, PreSumm's pre-LN decoder with a
final LayerNorm, the generator tied to the decoder embedding, the label-smoothed loss (divided
by the token count, as palm trains), AdamW; attention through F.scaled_dot_product_attention.
Training applies the reference's dropouts where palm does (`--dropout reference`: BERT's 0.1 on
the embeddings, attention probabilities and both sublayer outputs; the decoder's 0.2 on the
positions, both attention probabilities, both attention outputs and the feed-forward's inner
and outer activations) or none (`--dropout 0`, with `palm bench --dropout 0` its match).
Decoding is beam search with per-layer key/value caches and the encoder states computed once.

Prints one JSON object per measurement, in the same fields as `palm bench`:

    python3 torch_palm.py train --batch-size 8,64,256 --mode bf16
    python3 torch_palm.py decode --batch-size 1,64 --mode bf16

Modes: fp32 (no TF32), tf32 (TF32 matmuls), bf16 (autocast to bf16, f32 weights).
"""

import argparse
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB, D, HEADS, FF, LAYERS = 21128, 768, 12, 3072, 12
DEC_D, DEC_HEADS, DEC_FF, DEC_LAYERS = 768, 8, 3072, 12
PAD, BOS, EOS = 0, 101, 102
# Training dropout of the encoder and the decoder (set by --dropout).
DROP = {"enc": 0.1, "dec": 0.2}


def attention(q, k, v, heads, mask=None, causal=False, p=0.0):
    b, t, d = q.shape
    s = k.shape[1]
    q = q.view(b, t, heads, d // heads).transpose(1, 2)
    k = k.view(b, s, heads, d // heads).transpose(1, 2)
    v = v.view(b, s, heads, d // heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=p)
    return out.transpose(1, 2).reshape(b, t, d)


class EncoderLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.out = nn.Linear(D, D)
        self.ln1 = nn.LayerNorm(D, eps=1e-12)
        self.ff1 = nn.Linear(D, FF)
        self.ff2 = nn.Linear(FF, D)
        self.ln2 = nn.LayerNorm(D, eps=1e-12)

    def forward(self, x, mask):
        p = DROP["enc"] if self.training else 0.0
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        x = self.ln1(x + F.dropout(self.out(attention(q, k, v, HEADS, mask, p=p)), p))
        return self.ln2(x + F.dropout(self.ff2(F.gelu(self.ff1(x))), p))


class DecoderLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1 = nn.LayerNorm(DEC_D, eps=1e-6)
        self.self_qkv = nn.Linear(DEC_D, 3 * DEC_D)
        self.self_out = nn.Linear(DEC_D, DEC_D)
        self.ln2 = nn.LayerNorm(DEC_D, eps=1e-6)
        self.ctx_q = nn.Linear(DEC_D, DEC_D)
        self.ctx_kv = nn.Linear(DEC_D, 2 * DEC_D)
        self.ctx_out = nn.Linear(DEC_D, DEC_D)
        self.ln3 = nn.LayerNorm(DEC_D, eps=1e-6)
        self.ff1 = nn.Linear(DEC_D, DEC_FF)
        self.ff2 = nn.Linear(DEC_FF, DEC_D)

    def forward(self, x, memory_kv, src_mask, cache=None):
        p = DROP["dec"] if self.training else 0.0
        h = self.ln1(x)
        q, k, v = self.self_qkv(h).chunk(3, dim=-1)
        if cache is not None:
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=1)
                v = torch.cat([cache["v"], v], dim=1)
            cache["k"], cache["v"] = k, v
            x = x + self.self_out(attention(q, k, v, DEC_HEADS))
        else:
            a = attention(q, k, v, DEC_HEADS, causal=True, p=p)
            x = x + F.dropout(self.self_out(a), p)
        h = self.ln2(x)
        mk, mv = memory_kv
        c = attention(self.ctx_q(h), mk, mv, DEC_HEADS, src_mask, p=p)
        x = x + F.dropout(self.ctx_out(c), p)
        h = self.ln3(x)
        return x + F.dropout(self.ff2(F.dropout(F.gelu(self.ff1(h)), p)), p)


class Palm(nn.Module):
    def __init__(self):
        super().__init__()
        self.word = nn.Embedding(VOCAB, D, padding_idx=PAD)
        self.pos = nn.Embedding(512, D)
        self.token_type = nn.Embedding(2, D)
        self.emb_ln = nn.LayerNorm(D, eps=1e-12)
        self.encoder = nn.ModuleList(EncoderLayer() for _ in range(LAYERS))
        self.dec_emb = nn.Embedding(VOCAB, DEC_D, padding_idx=PAD)
        self.decoder = nn.ModuleList(DecoderLayer() for _ in range(DEC_LAYERS))
        self.dec_ln = nn.LayerNorm(DEC_D, eps=1e-6)
        self.gen_bias = nn.Parameter(torch.zeros(VOCAB))
        pe = torch.zeros(5000, DEC_D)
        position = torch.arange(0, 5000).unsqueeze(1).float()
        div = torch.exp(torch.arange(0, DEC_D, 2).float() * -(math.log(10000.0) / DEC_D))
        pe[:, 0::2] = torch.sin(position * div)
        pe[:, 1::2] = torch.cos(position * div)
        self.register_buffer("pe", pe)
        for emb in (self.word, self.pos, self.token_type, self.dec_emb):
            nn.init.normal_(emb.weight, std=0.02)

    def encode(self, src):
        b, s = src.shape
        pos = torch.arange(s, device=src.device)
        x = self.emb_ln(self.word(src) + self.pos(pos) + self.token_type(torch.zeros_like(src)))
        x = F.dropout(x, DROP["enc"] if self.training else 0.0)
        mask = (src != PAD)[:, None, None, :]
        for layer in self.encoder:
            x = layer(x, mask)
        return x, mask

    def memory_kv(self, memory):
        return [layer.ctx_kv(memory).chunk(2, dim=-1) for layer in self.decoder]

    def embed_tgt(self, tgt, offset=0):
        x = self.dec_emb(tgt) * math.sqrt(DEC_D)
        x = x + self.pe[offset : offset + tgt.shape[1]]
        return F.dropout(x, DROP["dec"] if self.training else 0.0)

    def log_probs(self, h):
        logits = F.linear(self.dec_ln(h), self.dec_emb.weight, self.gen_bias)
        return F.log_softmax(logits.float(), dim=-1)

    def forward(self, src, tgt_in):
        memory, mask = self.encode(src)
        kv = self.memory_kv(memory)
        x = self.embed_tgt(tgt_in)
        for layer, mkv in zip(self.decoder, kv):
            x = layer(x, mkv, mask)
        return self.log_probs(x)


def smoothed_loss(lp, gold, eps=0.1):
    """The reference's label-smoothed KL, divided by the non-PAD token count."""
    v = lp.shape[-1]
    lp = lp.reshape(-1, v)
    gold = gold.reshape(-1)
    keep = gold != PAD
    off = eps / (v - 2)
    conf = 1.0 - eps
    entropy = conf * math.log(conf) + (v - 2) * off * math.log(off)
    nll_gold = -lp.gather(1, gold[:, None]).squeeze(1)
    sum_off = -(lp.sum(1) - lp[:, PAD]) - nll_gold
    loss = entropy + conf * nll_gold + off * sum_off
    return (loss * keep).sum() / keep.sum()


def ids(rows, length, seed, device):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(106, VOCAB, (rows, length), generator=g).to(device)


def setup(mode):
    torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
    torch.backends.cudnn.allow_tf32 = mode == "tf32"
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=mode == "bf16")


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def sync_memory_reset():
    sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_mib():
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def train(args, batch):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(1)
    model = Palm().to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, eps=1e-8, weight_decay=0.01)
    src = ids(batch, args.src_len, 1, dev)
    tgt = ids(batch, args.tgt_len + 1, 2, dev)
    autocast = setup(args.mode)

    def step():
        with autocast:
            lp = model(src, tgt[:, :-1])
        loss = smoothed_loss(lp, tgt[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    # As palm: the losses are read (summed on the device, checked, and the last kept) every
    # --read-every steps; 1, the default, reads each step's, as a training loop's NaN check
    # and running mean do.
    pending = []

    def read(force=False):
        nonlocal pending
        if pending and (force or len(pending) >= args.read_every):
            total = torch.stack(pending).sum().item()
            assert math.isfinite(total), f"the loss became {total}"
            last = pending[-1].item()
            pending = []
            return last
        return None

    cold = time.perf_counter()
    for _ in range(args.warmup_steps):
        step().item()
    sync()
    cold = time.perf_counter() - cold
    sync_memory_reset()
    start = time.perf_counter()
    last = None
    for _ in range(args.steps):
        pending.append(step())
        last = read() or last
    last = read(force=True) or last
    sync()
    secs = time.perf_counter() - start
    samples = batch * args.steps / secs
    flops = 6 * (85e6 * args.src_len + (113e6 + 16.2e6) * args.tgt_len)
    return {
        "bench": "train", "impl": "pytorch", "mode": args.mode, "batch": batch,
        "src_len": args.src_len, "tgt_len": args.tgt_len, "steps": args.steps,
        "samples_per_s": samples, "tokens_per_s": samples * (args.src_len + args.tgt_len),
        "model_tflops_per_s": samples * flops / 1e12, "mfu_bf16_h200": samples * flops / 790e12,
        "peak_memory_mib": peak_mib(),
        "warmup_s": cold, "last_loss": last, "dropout": args.dropout, "torch": torch.__version__,
        "read_every": args.read_every,
    }


@torch.no_grad()
def beam_search(model, src, beam, steps):
    b = src.shape[0]
    memory, mask = model.encode(src)
    kv = model.memory_kv(memory)
    # Beams share the encoder states: tile the (smaller) cross-attention keys/values once.
    kv = [(k.repeat_interleave(beam, 0), v.repeat_interleave(beam, 0)) for k, v in kv]
    mask = mask.repeat_interleave(beam, 0)
    caches = [{} for _ in model.decoder]
    alive = torch.full((b * beam, 1), BOS, device=src.device)
    scores = torch.zeros(b, beam, device=src.device)
    scores[:, 1:] = -1e20
    for t in range(steps):
        x = model.embed_tgt(alive[:, -1:], offset=t)
        for layer, mkv, cache in zip(model.decoder, kv, caches):
            x = layer(x, mkv, mask, cache)
        lp = model.log_probs(x)[:, -1]
        lp[:, EOS] = -1e20  # forced length
        total = (scores.reshape(-1, 1) + lp).reshape(b, beam * VOCAB)
        scores, flat = total.topk(beam, dim=-1)
        origin = (flat // VOCAB + torch.arange(b, device=src.device)[:, None] * beam).reshape(-1)
        token = (flat % VOCAB).reshape(-1, 1)
        alive = torch.cat([alive.index_select(0, origin), token], dim=1)
        for cache in caches:
            cache["k"] = cache["k"].index_select(0, origin)
            cache["v"] = cache["v"].index_select(0, origin)
    return alive[:, 1:].reshape(b, beam, -1)[:, 0]


def decode(args, batch):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(1)
    model = Palm().to(dev).eval()
    src = ids(batch, args.src_len, 3, dev)
    autocast = setup(args.mode)
    with autocast:
        cold = time.perf_counter()
        for _ in range(args.warmup_steps):
            beam_search(model, src, args.beam_size, args.decode_steps)
        sync()
        cold = time.perf_counter() - cold
        sync_memory_reset()
        start = time.perf_counter()
        tokens = 0
        for _ in range(args.steps):
            out = beam_search(model, src, args.beam_size, args.decode_steps)
            tokens += out.numel()
        sync()
    secs = time.perf_counter() - start
    return {
        "bench": "decode", "impl": "pytorch", "mode": args.mode, "batch": batch,
        "beam": args.beam_size, "src_len": args.src_len, "decode_steps": args.decode_steps,
        "tokens_per_s": tokens / secs, "generated_tokens": tokens,
        "peak_memory_mib": peak_mib(),
        "warmup_s": cold, "torch": torch.__version__,
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["train", "decode"])
    p.add_argument("--batch-size", default="8")
    p.add_argument("--mode", choices=["fp32", "tf32", "bf16"], default="bf16")
    p.add_argument("--src-len", type=int, default=128)
    p.add_argument("--tgt-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--beam-size", type=int, default=5)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--dropout", choices=["reference", "0"], default="reference")
    p.add_argument("--read-every", type=int, default=1,
                   help="training: read the losses every N steps (1: every step)")
    args = p.parse_args()
    if args.dropout == "0":
        DROP.update(enc=0.0, dec=0.0)
    for batch in [int(b) for b in args.batch_size.split(",")]:
        run = train if args.what == "train" else decode
        print(json.dumps(run(args, batch)), flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
