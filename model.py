"""A LLaMA-family transformer with a static KV cache, in plain PyTorch.

One model serves Llama 2 / 3.x, Mistral, CodeLlama, TinyLlama, SmolLM2 and Qwen2-style checkpoints:
grouped-query attention, rotary embeddings (with Llama 3.1 frequency scaling), RMSNorm, SwiGLU,
optional q/k/v bias, optional tied embeddings and an optional sliding attention window.

Rotary embeddings rotate adjacent pairs (x[2i], x[2i+1]), the layout of Meta's original checkpoints
and of GGUF files; `scripts/convert_hf_checkpoint.py` permutes Hugging Face q/k weights into it.

References:
  LLaMA, https://arxiv.org/abs/2302.13971 ; RoFormer, https://arxiv.org/abs/2104.09864 ;
  GQA, https://arxiv.org/abs/2305.13245 ; gpt-fast, https://github.com/pytorch-labs/gpt-fast
"""
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

SUPPORTED_HF_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass
class ModelArgs:
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    n_kv_heads: int | None = None  # None: same as n_head (multi-head attention)
    dim: int = 4096
    intermediate_size: int | None = None  # None: the Llama rule, 2/3 of 4*dim rounded up to 256
    head_dim: int | None = None  # None: dim // n_head
    rope_base: float = 10000.0
    rope_scaling: dict | None = None  # Llama 3.1 kind: factor, low/high_freq_factor, original_max_position_embeddings
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    attention_bias: bool = False  # bias on the q, k, v projections (Qwen2)
    block_size: int = 2048  # the longest context the model was trained for
    sliding_window: int | None = None  # attend only to the last `sliding_window` positions (Mistral)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_head
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_head
        if self.intermediate_size is None:
            hidden = int(2 * (4 * self.dim) / 3)
            self.intermediate_size = 256 * math.ceil(hidden / 256)
        if self.n_head % self.n_kv_heads:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_scaling is not None:
            missing = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
            missing -= set(self.rope_scaling)
            if missing:
                raise ValueError(f"rope_scaling lacks {sorted(missing)}; only the Llama 3.1 kind is supported")

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        """Build from a dict of our own field names, rejecting unknown ones."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config fields {sorted(unknown)}; allowed: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        """Translate a Hugging Face `config.json` (llama, mistral or qwen2) into ModelArgs."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_HF_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_HF_MODEL_TYPES)}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r}; only silu (SwiGLU) is supported")
        if cfg.get("mlp_bias"):
            raise ValueError("mlp_bias=true is not supported")
        if model_type != "qwen2" and cfg.get("attention_bias"):
            raise ValueError("attention_bias=true on llama/mistral (a bias on o_proj too) is not supported")
        # transformers >= 5 writes rope_parameters; older versions rope_theta and rope_scaling
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_base = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"unsupported rope_type {rope_type!r}; supported: default, llama3")
        window = cfg.get("sliding_window")
        if model_type == "qwen2":
            if cfg.get("use_sliding_window"):
                raise ValueError("qwen2 with use_sliding_window=true is not supported")
            window = None
        n_head = cfg["num_attention_heads"]
        return cls(
            vocab_size=cfg["vocab_size"],
            n_layer=cfg["num_hidden_layers"],
            n_head=n_head,
            n_kv_heads=cfg.get("num_key_value_heads") or n_head,
            dim=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_head,
            rope_base=float(rope_base),
            rope_scaling=rope if rope_type == "llama3" else None,
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2",
            block_size=cfg.get("max_position_embeddings", 2048),
            sliding_window=window,
        )


def precompute_freqs_cis(seq_len: int, head_dim: int, base: float, rope_scaling: dict | None = None) -> Tensor:
    """cos and sin of every position and frequency: (seq_len, head_dim // 2, 2), float32."""
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if rope_scaling is not None:
        freqs = apply_rope_scaling(freqs, **rope_scaling)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), freqs)  # (seq_len, head_dim // 2)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)


def apply_rope_scaling(freqs: Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                       original_max_position_embeddings: int) -> Tensor:
    """Llama 3.1 scaling: long wavelengths slowed down by `factor`, short ones kept, a smooth blend between."""
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    out = torch.where(wavelen > low_freq_wavelen, freqs / factor, blended)
    return torch.where(wavelen < high_freq_wavelen, freqs, out)


def apply_rotary_emb(x: Tensor, freqs_cis: Tensor) -> Tensor:
    """Rotate adjacent pairs of x (B, T, H, D) by the angles in freqs_cis: (T, D // 2, 2) for every row, or
    (B, T, D // 2, 2), each row its own."""
    xs = x.float().view(*x.shape[:-1], -1, 2)  # (B, T, H, D/2, 2)
    fc = freqs_cis.unsqueeze(-3)  # (T, 1, D/2, 2) or (B, T, 1, D/2, 2): the same angles for every head
    out = torch.stack(
        [xs[..., 0] * fc[..., 0] - xs[..., 1] * fc[..., 1], xs[..., 1] * fc[..., 0] + xs[..., 0] * fc[..., 1]], dim=-1
    )
    return out.flatten(3).type_as(x)  # (B, T, H, D)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x / rms(x) * weight, computed in float32."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) v for q (B, H, T, D) over k, v (B, KV, S, D) with H a multiple of KV.

    Under torch.compile the query heads of a kv head broadcast against it, which inductor fuses into one
    reduction; eager PyTorch would copy k for that, so it folds them into the rows of a batched matmul.
    """
    B, H, T, D = q.shape
    KV, rep = k.size(1), H // k.size(1)
    if torch.compiler.is_compiling():
        qg = q.view(B, KV, rep, T, D)  # (B, KV, rep, T, D): the query heads that share each kv head
        scores = (qg @ k.unsqueeze(2).transpose(-1, -2)).float() / math.sqrt(D)  # (B, KV, rep, T, S)
    else:
        qg = q.reshape(B, KV, rep * T, D)  # (B, KV, rep * T, D)
        scores = (qg @ k.transpose(-1, -2)).float().view(B, KV, rep, T, -1) / math.sqrt(D)  # (B, KV, rep, T, S)
    scores = scores.masked_fill(~mask.unsqueeze(2), float("-inf"))
    p = torch.softmax(scores, dim=-1).to(v.dtype)
    if torch.compiler.is_compiling():
        return (p @ v.unsqueeze(2)).view(B, H, T, D)  # (B, KV, rep, T, D) -> (B, H, T, D)
    return (p.view(B, KV, rep * T, -1) @ v).view(B, H, T, D)


def fit_context(prompt_len: int, max_new_tokens: int, context: int, room: int = 0) -> int:
    """How many of max_new_tokens fit in `context` positions after a prompt of prompt_len tokens and `room` positions
    a decoding scheme needs beyond them (speculation's guesses); ValueError, with both lengths, when the prompt alone
    does not fit."""
    if prompt_len + room >= context:
        extra = f" ({room} of them kept for speculation)" if room else ""
        raise ValueError(f"the prompt has {prompt_len} tokens but the context holds {context}{extra}; shorten the "
                         "prompt or use a longer context")
    return min(max_new_tokens, context - prompt_len - room)


def attention_mask(input_pos: Tensor, S: int, window: int | None) -> Tensor:
    """Which of the S cache positions a query at each of input_pos (any shape) may see: (..., S) bool, key j <= i
    (and j > i - window); the last position, the scratch one, sees itself alone. Computed from the positions, not
    read from an (S, S) table, which would take S^2 bytes (16 GB at 128k positions)."""
    keys = torch.arange(S, device=input_pos.device)
    q = input_pos[..., None]
    mask = keys <= q
    if window is not None:
        mask = mask & (keys > q - window)
    return torch.where(q == S - 1, keys == S - 1, mask)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


KV_BLOCK = 32  # values of a key or value vector that share one scale in an int8 KV cache (llama.cpp's q8_0 block)


def quantize_kv(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """x (..., D) -> int8 q (..., D) and float32 scales s (..., D // block), x ~ q * s per block of `block` values:
    s = max |x| / 127 over the block, q = round(x / s). Each vector by itself, so a row's cache is the same whatever
    else is in the batch."""
    xb = x.float().unflatten(-1, (-1, block))  # (..., D // block, block)
    s = xb.abs().amax(-1, keepdim=True) / 127
    q = torch.where(s > 0, xb / s, 0.0).round().clamp(-127, 127).to(torch.int8)
    return q.flatten(-2), s.squeeze(-1)


def dequantize_kv(q: Tensor, s: Tensor, dtype: torch.dtype) -> Tensor:
    """quantize_kv's q (..., D) and s (..., D // block) -> q * s (..., D) in dtype."""
    return (q.unflatten(-1, (s.size(-1), -1)).float() * s[..., None]).flatten(-2).to(dtype)


def cache_rows(row: int | Tensor, B: int, device: torch.device) -> Tensor:
    """The KV cache rows (B,) of a batch: row..row+B-1, or the rows a tensor row (B,) names."""
    return row if isinstance(row, Tensor) else torch.arange(row, row + B, device=device)


class KVCache(nn.Module):
    """Keys and values of every row, kv head and position: k_cache and v_cache (R, n_kv, S, D) stored in `dtype`, or,
    for dtype torch.int8, int8 with a float32 scale per block of KV_BLOCK values in k_scales and v_scales
    (R, n_kv, S, D // block). Attention reads them in `compute_dtype`, the activations'."""

    def __init__(self, max_batch_size: int, max_seq_length: int, n_kv_heads: int, head_dim: int, dtype,
                 device=None, compute_dtype=None):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_length, head_dim)
        self.compute_dtype = compute_dtype or dtype
        self.quantized = dtype == torch.int8
        self.block = KV_BLOCK if head_dim % KV_BLOCK == 0 else head_dim  # a head of other sizes: one scale each
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        if self.quantized:
            scales = (*shape[:3], head_dim // self.block)
            self.register_buffer("k_scales", torch.zeros(scales, device=device), persistent=False)
            self.register_buffer("v_scales", torch.zeros(scales, device=device), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        """How keys and values are stored (torch.int8: with scales)."""
        return self.k_cache.dtype

    def stored(self) -> list[Tensor]:
        """Every tensor the cache holds, (R, n_kv, S, ...) each: k and v, and their scales when int8."""
        return [t for _, t in self.named_buffers()]

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, row: int | Tensor = 0) -> None:
        """Write k, v (B, n_kv, T, D) into cache rows row..row+B-1, or into the rows a tensor row (B,) names, at
        positions input_pos: (T,) for every row, or (B, T), each row its own."""
        # written through the whole cache, never a slice of it: under torch.compile a write into a slice copies the
        # whole cache (all rows, every position) on every step
        rows = cache_rows(row, k.size(0), k.device)[:, None]
        pos = input_pos if input_pos.dim() == 2 else input_pos[None]  # index (B, 1) x (B or 1, T): (B, T, n_kv, D)
        for x, cache, scales in ((k, self.k_cache, "k_scales"), (v, self.v_cache, "v_scales")):
            x = x.transpose(1, 2)  # (B, T, n_kv, D)
            if self.quantized:
                x, s = quantize_kv(x, self.block)
                getattr(self, scales)[rows, :, pos] = s
            cache[rows, :, pos] = x.to(cache.dtype)

    def rows(self, row: int | Tensor, B: int, length: int | None = None) -> tuple[Tensor, Tensor]:
        """k, v (B, n_kv, length or S, D) in compute_dtype: cache rows row..row+B-1, or the rows a tensor row (B,)
        names, their first `length` positions (default all)."""
        index = row if isinstance(row, Tensor) else slice(row, row + B)
        out = []
        for name in ("k", "v"):
            x = getattr(self, f"{name}_cache")[index, :, :length]
            if self.quantized:
                x = dequantize_kv(x, getattr(self, f"{name}_scales")[index, :, :length], self.compute_dtype)
            out.append(x.to(self.compute_dtype))
        return out[0], out[1]

    def read(self, row: int, length: int) -> list[Tensor]:
        """Copies of the first `length` positions of batch row `row`: stored()'s tensors, (n_kv, length, ...) each."""
        return [t[row, :, :length].clone() for t in self.stored()]

    def write(self, row: int, saved: list[Tensor]) -> None:
        """Fill the first positions of batch row `row` with what read() returned, e.g. a prefix read earlier."""
        for t, x in zip(self.stored(), saved, strict=True):
            t[row, :, :x.size(1)] = x.to(t.device)


def attend_cache(q: Tensor, cache: KVCache, mask: Tensor, row: int | Tensor) -> Tensor:
    """decode_attention of q (B, H, 1, D) over the cache rows row..row+B-1, or the rows a tensor row (B,) names."""
    k, v = cache.rows(row, q.size(0))
    return decode_attention(q, k, v, mask)


class Attention(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.n_head, self.n_kv_heads, self.head_dim = config.n_head, config.n_kv_heads, config.head_dim
        qkv_dim = (config.n_head + 2 * config.n_kv_heads) * config.head_dim
        self.wqkv = nn.Linear(config.dim, qkv_dim, bias=config.attention_bias)
        self.wo = nn.Linear(config.n_head * config.head_dim, config.dim, bias=False)
        self.kv_cache: KVCache | None = None
        self.decode_attention = attend_cache  # attention of one new token; layers.py may swap in its own

    def forward(self, x: Tensor, freqs_cis: Tensor, mask: Tensor | None, input_pos: Tensor,
                cache_row: int | Tensor = 0) -> Tensor:
        B, T, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = apply_rotary_emb(q.view(B, T, self.n_head, self.head_dim), freqs_cis)
        k = apply_rotary_emb(k.view(B, T, self.n_kv_heads, self.head_dim), freqs_cis)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, head_dim)
        self.kv_cache.update(input_pos, k, v, cache_row)
        gqa = self.n_head != self.n_kv_heads
        if mask is not None and T == 1:  # decoding: plain math the compiler fuses beats a flash kernel for one query
            y = self.decode_attention(q, self.kv_cache, mask, cache_row)
        else:  # a prompt: attention over the first T (causal) or the mask's positions (Transformer.forward)
            k, v = self.kv_cache.rows(cache_row, B, T if mask is None else mask.size(-1))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, q_size)  # (B, T, n_head * head_dim)
        return self.wo(y)


class FeedForward(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(config.dim, config.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(config.intermediate_size, config.dim, bias=False)  # down
        self.glu = None  # x -> silu(w1(x)) * w3(x) in one call; kernels.py / quantize.py may set one for their kernels

    def forward(self, x: Tensor) -> Tensor:
        fused = self.glu is not None and not any(m._forward_hooks or m._forward_pre_hooks for m in (self.w1, self.w3))
        h = self.glu(x) if fused else F.silu(self.w1(x)) * self.w3(x)  # a hooked w1 or w3 must run itself
        return self.w2(h)


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x: Tensor, freqs_cis: Tensor, mask: Tensor | None, input_pos: Tensor,
                cache_row: int | Tensor = 0) -> Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask, input_pos, cache_row)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.config = config
        # nn.Embedding's own normal_ init has no C++ kernel on the meta device, where checkpoints build the model:
        # its first use there imports torch's Python decompositions (2.3 s and 76 MB on every load); so it is made
        # empty and initialized only on a real device
        table = torch.empty(config.vocab_size, config.dim)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim, _weight=table)
        if not self.tok_embeddings.weight.is_meta:
            nn.init.normal_(self.tok_embeddings.weight)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.tie_weights()
        self.max_batch_size = -1
        self.max_seq_length = -1
        self.kv_dtype: torch.dtype | None = None  # how the KV cache stores keys and values (torch.int8: with scales);
        # None: in the activations' dtype. The loader sets it (--kv_dtype); setup_caches reads it

    def tie_weights(self) -> None:
        """Tied embeddings: the output layer reads the embedding's own tensors (its weight, and a quantized one's
        scales). Called at construction and again after load_state_dict(assign=True), which unties them."""
        for name, t in [*self.tok_embeddings.named_parameters(recurse=False),
                        *self.tok_embeddings.named_buffers(recurse=False)]:
            setattr(self.output, name, t)

    @property
    def device(self) -> torch.device:
        """Where token ids go in: the embedding's device (the first stage when layers sit on several devices)."""
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype, which the KV cache takes too (an int8 embedding's weight is not)."""
        return self.norm.weight.dtype

    def setup_caches(self, max_batch_size: int, max_seq_length: int) -> None:
        """Allocate each layer's KV cache beside it, the rotary table beside the embedding.

        Positions 0..max_seq_length-1 are the text's; one more, max_seq_length, is a scratch position for a row that
        holds no text but must be computed (a server's idle row where every step computes all rows, or its
        warm-up): a token there writes its KV there and attends to that position alone, so it costs next to nothing
        and touches nothing a row holds.
        """
        if max_seq_length > self.config.block_size:
            raise ValueError(f"max_seq_length {max_seq_length} exceeds the model's context of {self.config.block_size}")
        dtype, device = self.dtype, self.device
        kv_dtype = self.kv_dtype or dtype
        cache = self.layers[0].attention.kv_cache if self.layers else None
        if (self.max_batch_size >= max_batch_size and self.max_seq_length == max_seq_length
                and (cache is None or cache.dtype == kv_dtype)):
            return
        self.max_batch_size, self.max_seq_length = max_batch_size, max_seq_length
        c = self.config
        S = max_seq_length + 1  # with the scratch position
        for block in self.layers:  # each block's own heads (fewer under tensor parallelism) and device
            a, w = block.attention, block.attention_norm.weight
            a.kv_cache = KVCache(max_batch_size, S, a.n_kv_heads, a.head_dim, kv_dtype, w.device, dtype)
        freqs = precompute_freqs_cis(S, c.head_dim, c.rope_base, c.rope_scaling)
        self.register_buffer("freqs_cis", freqs.to(device), persistent=False)

    def forward(self, idx: Tensor, input_pos: Tensor, key_mask: Tensor | None = None,
                last_only: bool = False, cache_row: int | Tensor = 0) -> Tensor:
        """Logits (B, T, vocab) for tokens idx (B, T) at positions input_pos; (B, 1, vocab) if last_only.

        input_pos is (T,), the same positions for every row, or (B, T), each row its own (a batch of requests
        at different points of their texts). Each row attends causally over its own positions only, so what a
        cache row holds beyond them (an earlier occupant's tokens, a padded tail) stays hidden. The batch uses
        cache rows cache_row..cache_row+B-1. key_mask (B, S), with (T,) positions, says which cache positions each
        row may attend to: rows of different lengths are left-padded and their padding masked. A padding position
        still sees itself, so that its (unused) output stays finite. cache_row may instead be a tensor (B,) naming
        each row's cache row (a server's running requests, wherever they sit).
        """
        assert self.max_seq_length > 0, "call setup_caches first"
        per_row = input_pos.dim() == 2
        S = self.max_seq_length + 1  # the text's positions and the scratch one, which is no row's key
        mask = attention_mask(input_pos, S, self.config.sliding_window)
        mask = mask.unsqueeze(1) if per_row else mask[None, None]  # (B or 1, 1, T, S)
        if key_mask is not None:
            assert not per_row, "key_mask goes with positions shared by every row"
            own = torch.arange(S, device=input_pos.device) == input_pos[:, None]  # (T, S)
            keys = F.pad(key_mask, (0, S - key_mask.size(-1)))  # (B, S)
            mask = mask & (keys[:, None, None, :] | own)  # (B, 1, T, S)
        T, window = idx.size(1), self.config.sliding_window
        if T > 1 and not torch.compiler.is_compiling():  # eager prefill: no query sees a key after the last position
            mask = mask[..., : int(input_pos.max()) + 1]
            if (not per_row and mask.size(-1) == T and key_mask is None and (window is None or T <= window)
                    and torch.equal(input_pos, torch.arange(T, device=input_pos.device))):
                mask = None  # exactly causal: attention may skip the masked half (Attention.forward)
        freqs_cis = self.freqs_cis[input_pos]  # (T, head_dim / 2, 2) or (B, T, head_dim / 2, 2)
        x = self.tok_embeddings(idx)  # (B, T, dim)
        for layer in self.layers:  # layers may sit on several devices (tp.split_layers); .to is free on one
            dev = layer.attention_norm.weight.device
            x = layer(x.to(dev), freqs_cis.to(dev), None if mask is None else mask.to(dev), input_pos.to(dev),
                      cache_row)
        if last_only:  # prefill samples from the last position: the output layer need not see the others
            x = x[:, -1:]
        return self.output(self.norm(x.to(self.norm.weight.device)))
