"""The GPT of the nanochat speedrun (docs/reference.md#model), in plain PyTorch.

    from core.gpt import GPTConfig, build_model, KVCache
    model = build_model(GPTConfig(n_layer=4, n_head=4, n_kv_head=4, n_embd=256), "cpu")
    loss = model(idx, targets)                       # mean CE over targets != -1
    logits = model(idx)                              # (B, T, vocab) fp32, soft-capped
    cache = KVCache.for_model(model, batch_size=1, max_seq_len=256)
    logits = model(prompt, kv_cache=cache)           # prefill; then model(next_tok, kv_cache=cache)

Architecture: untied wte / lm_head with the vocab padded to a multiple of 64; parameter-free
RMSNorm after the embedding, before attention and MLP, on q/k (QK-norm, then x1.2) and before
lm_head; RoPE base 1e5; ReLU^2 MLP (4x); GQA; sliding windows tiled from a pattern ("SSSL", last
layer full); value embeddings on alternating layers (ResFormer, arXiv:2410.17897) gated per kv
head; per-layer resid/x0 scalars (modded-nanogpt); smear (previous-token mixing); backout of the
mid-network residual; logits soft-capped at 15 (Gemma 2). Master weights are fp32; matmuls run in
`model.compute_dtype` (Linear casts its weight to the activation dtype).

On CPU the training loss is a chunked, fused lm_head + soft-cap + cross-entropy
(`softcap_cross_entropy`): the (tokens x 32768) logits are never materialised in full, the gradient
is produced in the same pass (the Liger-kernel idea, arXiv:2410.10989) and the elementwise work runs
on L2-sized blocks; with the fused AdamW it makes small-model steps 1.5-2.5x faster than full logits
+ F.cross_entropy (bench/train_step.py). On CUDA the loss is the reference's full-logits form.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.attention import attention, attention_kvcache

IGNORE_INDEX = -1
VE_GATE_CHANNELS = 12      # value-embedding gate reads x[..., :12]
SMEAR_CHANNELS = 24        # smear gate reads x[..., :24]
QK_SCALE = 1.2             # after QK-norm: sharper attention


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"
    pad_vocab_to: int = 64
    rope_base: float = 100_000.0
    softcap: float = 15.0

    def __post_init__(self):
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "pad_vocab_to"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.head_dim % 2:
            raise ValueError(f"GPTConfig: head_dim={self.head_dim} must be even for rotary embeddings")
        if self.n_kv_head > self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"GPTConfig: n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if max(VE_GATE_CHANNELS, SMEAR_CHANNELS) > self.n_embd:
            raise ValueError(f"GPTConfig: n_embd={self.n_embd} must be >= {SMEAR_CHANNELS} (gate inputs)")
        pattern = self.window_pattern.upper()
        if not pattern or set(pattern) - {"S", "L"}:
            raise ValueError(f"GPTConfig.window_pattern={self.window_pattern!r}: use only S (short) and L (long)")
        self.window_pattern = pattern
        if self.softcap <= 0:
            raise ValueError(f"GPTConfig.softcap must be > 0, got {self.softcap}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.pad_vocab_to) * self.pad_vocab_to

    @property
    def short_window(self) -> int:
        # a quarter of the context, rounded up to the 128-token flash-attention tile (512 at 2048)
        return -(-self.sequence_len // 4 // 128) * 128

    def window_sizes(self) -> list[int]:
        """Left window per layer (flash-attn convention); the last layer is always full."""
        full, short = self.sequence_len, self.short_window
        sizes = [short if self.window_pattern[i % len(self.window_pattern)] == "S" else full
                 for i in range(self.n_layer)]
        sizes[-1] = full
        return sizes

    def has_ve(self, layer: int) -> bool:
        """Value embeddings on alternating layers, the last one always included."""
        return layer % 2 == (self.n_layer - 1) % 2

    @property
    def backout_layer(self) -> int:
        return self.n_layer // 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"GPTConfig.from_dict: unknown keys {sorted(unknown)} (known: {sorted(known)})")
        return cls(**d)


def count_params(config: GPTConfig) -> dict:
    """Parameter counts by group, from the config alone (what GPT.param_counts() returns)."""
    c, vp, kv = config.n_embd, config.padded_vocab_size, config.n_kv_head * config.head_dim
    n_ve = sum(config.has_ve(i) for i in range(config.n_layer))
    per_block = c * c + 2 * c * kv + c * c + 8 * c * c
    blocks = config.n_layer * per_block + n_ve * kv // config.head_dim * VE_GATE_CHANNELS
    counts = {
        "wte": vp * c,
        "value_embeds": n_ve * vp * kv,
        "lm_head": vp * c,
        "transformer_matrices": blocks,
        "scalars": 2 * config.n_layer + SMEAR_CHANNELS + 2,
    }
    counts["total"] = sum(counts.values())
    return counts


def estimate_flops(config: GPTConfig) -> float:
    """Training FLOPs per token (fwd+bwd): 6 per matmul weight + 12·h·d·min(window, T) per layer
    for the attention scores (PaLM appendix B, arXiv:2204.02311); embeddings are lookups."""
    counts = count_params(config)
    matmul = counts["transformer_matrices"] + counts["lm_head"] + SMEAR_CHANNELS
    t, h, d = config.sequence_len, config.n_head, config.head_dim
    attn = sum(12 * h * d * min(w, t) for w in config.window_sizes())
    return float(6 * matmul + attn)


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


class Linear(nn.Linear):
    """nn.Linear without autocast: the fp32 master weight is cast to the activation dtype.
    `fp8` ("tensorwise"/"rowwise") routes the matmul through core.fp8 (H100+ only)."""

    fp8: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8 is not None:
            from core.fp8 import fp8_linear
            return fp8_linear(x, self.weight, self.fp8)
        return F.linear(x, self.weight.to(x.dtype))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # rotates by -theta (the reference's convention; only relative q/k rotation matters)
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer, self.n_head, self.n_kv_head, self.head_dim = layer, config.n_head, config.n_kv_head, config.head_dim
        c, kv = config.n_embd, config.n_kv_head * config.head_dim
        self.c_q = Linear(c, c, bias=False)
        self.c_k = Linear(c, kv, bias=False)
        self.c_v = Linear(c, kv, bias=False)
        self.c_proj = Linear(c, c, bias=False)
        self.ve_gate = Linear(VE_GATE_CHANNELS, config.n_kv_head, bias=False) if config.has_ve(layer) else None

    def forward(self, x, ve, cos, sin, window: int, kv_cache: "KVCache | None"):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # ResFormer value residual, gate in (0, 3) per kv head
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = norm(q) * QK_SCALE, norm(k) * QK_SCALE
        if kv_cache is None:
            y = attention(q, k, v, window)
        else:
            y = attention_kvcache(q, kv_cache.k[self.layer], kv_cache.v[self.layer], k, v, kv_cache.pos, window)
        return self.c_proj(y.reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, window, kv_cache):
        x = x + self.attn(norm(x), ve, cos, sin, window, kv_cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, compute_dtype: torch.dtype = torch.float32):
        """Shapes only: safe under torch.device("meta"); call init_weights() after to_empty()."""
        super().__init__()
        self.config = config
        self.compute_dtype = compute_dtype
        # fused chunked loss: None = on CPU only (on CUDA the plain logits + cross-entropy is what the
        # reference compiles into fused kernels, and per-block Python loops would mean kernel launches)
        self.fused_loss: bool | None = None
        self.loss_chunk_rows = 2048     # rows of logits per chunk in the fused loss (matmul granularity)
        self.window_sizes = config.window_sizes()
        vp, c, kv = config.padded_vocab_size, config.n_embd, config.n_kv_head * config.head_dim
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(vp, c),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = Linear(c, vp, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        self.smear_gate = Linear(SMEAR_CHANNELS, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(vp, kv)
                                           for i in range(config.n_layer) if config.has_ve(i)})
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self.rotary_len = config.sequence_len * 10

    # ---------------------------------------------------------------- init
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> "GPT":
        """The reference init: wte N(0, 0.8), lm_head N(0, 0.001), q/k/v U(±√3/√d), c_fc 0.4x that,
        output projections zero, value embeddings like c_v, gates U(0, 0.02), scalars as listed."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.lm_head.weight.device).manual_seed(seed)
        cfg = self.config
        nn.init.normal_(self.transformer.wte.weight, 0.0, 0.8, generator=gen)
        nn.init.normal_(self.lm_head.weight, 0.0, 0.001, generator=gen)
        s = 3 ** 0.5 * cfg.n_embd ** -0.5  # uniform with the std of N(0, 1/d), and no outliers
        for block in self.transformer.h:
            nn.init.uniform_(block.attn.c_q.weight, -s, s, generator=gen)
            nn.init.uniform_(block.attn.c_k.weight, -s, s, generator=gen)
            nn.init.uniform_(block.attn.c_v.weight, -s, s, generator=gen)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * s, 0.4 * s, generator=gen)
            nn.init.zeros_(block.mlp.c_proj.weight)
        n = cfg.n_layer
        for i in range(n):
            self.resid_lambdas[i] = 1.15 - 0.10 * i / max(n - 1, 1)
            self.x0_lambdas[i] = 0.20 - 0.15 * i / max(n - 1, 1)
        nn.init.zeros_(self.smear_lambda)
        nn.init.constant_(self.backout_lambda, 0.2)
        nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02, generator=gen)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s, generator=gen)
        for block in self.transformer.h:
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02, generator=gen)
        self._rope = None
        self.rotary(0, 1, torch.float32)  # eagerly, never inside a compiled region (inductor's cos differs)
        return self

    def rotary(self, start: int, length: int, dtype: torch.dtype):
        """cos/sin for positions [start, start+length), shaped (1, T, 1, head_dim/2)."""
        device = self.lm_head.weight.device
        if self._rope is None or self._rope[0].device != device:
            # The table outlives the call: if the first forward runs under inference_mode (an eval
            # or generation before training), an inference tensor cached here would break every
            # later backward ("Inference tensors cannot be saved for backward").
            with torch.inference_mode(False), torch.no_grad():
                d = self.config.head_dim
                inv_freq = 1.0 / (self.config.rope_base ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
                freqs = torch.outer(torch.arange(self.rotary_len, dtype=torch.float32, device=device), inv_freq)
                self._rope = (freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :])
        if start + length > self.rotary_len:
            raise ValueError(f"position {start + length} is beyond the rotary table ({self.rotary_len} = "
                             "10 x sequence_len): use a shorter context or a config with a longer sequence_len")
        cos, sin = self._rope
        return cos[:, start:start + length].to(dtype), sin[:, start:start + length].to(dtype)

    # ---------------------------------------------------------------- counts
    def param_counts(self) -> dict:
        counts = {
            "wte": self.transformer.wte.weight.numel(),
            "value_embeds": sum(p.numel() for p in self.value_embeds.parameters()),
            "lm_head": self.lm_head.weight.numel(),
            "transformer_matrices": sum(p.numel() for p in self.transformer.h.parameters()),
            "scalars": sum(p.numel() for p in (self.resid_lambdas, self.x0_lambdas, self.smear_gate.weight,
                                                self.smear_lambda, self.backout_lambda)),
        }
        counts["total"] = sum(counts.values())
        assert counts["total"] == sum(p.numel() for p in self.parameters()), "a parameter is in no group"
        return counts

    def num_params(self) -> int:
        return self.param_counts()["total"]

    def num_scaling_params(self) -> int:
        """Transformer matrices + lm_head: the count that gives the cleanest scaling laws."""
        c = self.param_counts()
        return c["transformer_matrices"] + c["lm_head"]

    def estimate_flops(self) -> float:
        return estimate_flops(self.config)

    def set_compute_dtype(self, dtype: torch.dtype) -> "GPT":
        self.compute_dtype = dtype
        return self

    def compile_for_training(self, **compile_kwargs) -> "GPT":
        """torch.compile the trunk (embedding -> blocks -> final norm) for training calls (gradients
        enabled, no KV cache); evaluation and inference stay eager, so their varying shapes never
        trigger recompiles. The loss head stays eager too: big matmuls plus an L2-blocked loop that
        compile made slower. Returns self. Shapes are static (dynamic=False), as in training.
        Measured on CPU: d4/d6 bf16 trunk fwd+bwd ~2x faster; first call 60-90 s cold, ~5-15 s with
        a warm inductor cache."""
        compile_kwargs.setdefault("dynamic", False)
        self.rotary(0, 1, self.compute_dtype)  # fill the rope cache eagerly: eager and compiled share it
        self._compiled_trunk = torch.compile(self.trunk, **compile_kwargs)
        return self

    # ---------------------------------------------------------------- forward
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: "KVCache | None" = None, loss_reduction: str = "mean", last_only: bool = False):
        """targets given: the loss ('mean' over targets != -1, 'sum', or 'none' -> (B, T) fp32 with 0 at
        ignored positions). Else logits (B, T, vocab_size) fp32 (only the last position if last_only).
        With kv_cache: appends idx at positions [cache.pos, cache.pos + T) and advances cache.pos."""
        compiled = self.__dict__.get("_compiled_trunk")
        if compiled is not None and kv_cache is None and torch.is_grad_enabled():
            x = compiled(idx)
        else:
            x = self.trunk(idx, kv_cache)
        if targets is not None:
            return self.loss_from_hidden(x, targets, loss_reduction)
        if last_only:
            x = x[:, -1:]
        return self.head(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final hidden states (from trunk) -> soft-capped fp32 logits (..., vocab_size)."""
        logits = self.lm_head(x)[..., :self.config.vocab_size].float()
        cap = self.config.softcap
        return cap * torch.tanh(logits / cap)

    def trunk(self, idx: torch.Tensor, kv_cache: "KVCache | None" = None) -> torch.Tensor:
        """Token ids (B, T) -> final normed hidden states (B, T, n_embd) in the compute dtype."""
        B, T = idx.shape
        dtype = self.compute_dtype
        pos = 0
        if kv_cache is not None:
            pos = kv_cache.pos
            if kv_cache.k.dtype != dtype:
                raise ValueError(f"KVCache dtype {kv_cache.k.dtype} != model compute dtype {dtype}: "
                                 "build it with KVCache.for_model(model, ...)")
            if pos + T > kv_cache.max_seq_len:
                raise ValueError(f"KVCache is full: {pos} + {T} tokens > max_seq_len {kv_cache.max_seq_len}")
        cos, sin = self.rotary(pos, T, dtype)

        x = norm(self.transformer.wte(idx).to(dtype))
        # Smear: x_t += λ·σ(W·x_t[:24])·x_{t-1}, on the pre-smear normed embeddings (cheap bigram signal)
        prev = None if kv_cache is None else kv_cache.prev_embedding
        if kv_cache is not None:
            kv_cache.prev_embedding = x[:, -1:].detach().clone()
        lam = self.smear_lambda.to(dtype)
        if prev is None:
            if T > 1:
                gate = lam * torch.sigmoid(self.smear_gate(x[:, 1:, :SMEAR_CHANNELS]))
                x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
        else:
            shifted = torch.cat([prev, x[:, :-1]], dim=1) if T > 1 else prev
            x = x + lam * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS])) * shifted

        x0 = x
        x_backout = None
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i].to(dtype) * x + self.x0_lambdas[i].to(dtype) * x0
            ve = self.value_embeds[str(i)](idx).to(dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, self.window_sizes[i], kv_cache)
            if i == self.config.backout_layer:
                x_backout = x
        if kv_cache is not None:
            kv_cache.pos += T
        if x_backout is not None:  # remove the low-level features of the mid-network residual
            x = x - self.backout_lambda.to(dtype) * x_backout
        return norm(x)

    def loss_from_hidden(self, x: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"):
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"loss_reduction={reduction!r}: use 'mean', 'sum' or 'none'")
        h, t = x.reshape(-1, x.size(-1)), targets.reshape(-1)
        cfg = self.config
        fused = self.fused_loss if self.fused_loss is not None else x.device.type == "cpu"
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.lm_head.weight.requires_grad)
        if not fused or (needs_grad and reduction == "none"):
            loss = plain_softcap_cross_entropy(h, self.lm_head.weight, t, cfg.vocab_size, cfg.softcap, reduction)
        else:
            loss = softcap_cross_entropy(h, self.lm_head.weight, t, cfg.vocab_size, cfg.softcap,
                                         reduction, self.loss_chunk_rows)
        return loss.view_as(targets) if reduction == "none" else loss


# -------------------------------------------------------------------------------------------- loss


def plain_softcap_cross_entropy(h, weight, targets, vocab_size: int, softcap: float, reduction: str):
    """Reference loss: full logits in the compute dtype, then fp32, soft-cap, F.cross_entropy."""
    logits = F.linear(h, weight.to(h.dtype))[..., :vocab_size].float()
    logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction=reduction)


SUB_ROWS = 16  # rows of logits per elementwise block: 16 x 32768 fp32 = 2 MiB stays in L2


def _ce_rows(z: torch.Tensor, tgt: torch.Tensor, softcap: float, scale: torch.Tensor | None) -> torch.Tensor:
    """Soft-capped CE of raw logits z (n, V) against tgt (n,); returns the per-row loss (fp32, 0 where
    ignored). z is clobbered: when `scale` (the loss weight of one valid row) is given, it ends up
    holding dL/dz (in z's dtype).

    The elementwise work runs on SUB_ROWS-row blocks so that its ~10 passes hit L2 instead of DRAM
    (2-3x faster on CPU than whole-chunk passes). |softcap·tanh| <= softcap, so exp() cannot overflow
    and no max-subtraction pass is needed (e^15 · 32768 ~ 1e11 fits fp32)."""
    n = z.size(0)
    loss = torch.empty(n, dtype=torch.float32, device=z.device)
    valid_all = tgt != IGNORE_INDEX
    safe_all = tgt.clamp_min(0).unsqueeze(1)
    for s in range(0, n, SUB_ROWS):
        zc, valid, safe = z[s:s + SUB_ROWS], valid_all[s:s + SUB_ROWS], safe_all[s:s + SUB_ROWS]
        t = zc.float().mul_(1.0 / softcap).tanh_()        # in place on z when z is fp32: z is ours to clobber
        e = t * softcap                                   # capped logits
        picked = e.gather(1, safe).squeeze(1)
        total = e.exp_().sum(dim=1)
        loss[s:s + SUB_ROWS] = (total.log() - picked).masked_fill_(~valid, 0.0)
        if scale is None:
            continue
        # dL/dz = (softmax - onehot) · (1 - tanh²) · row weight (0 for ignored rows)
        w = valid.to(torch.float32) * scale
        e.mul_((w / total).unsqueeze(1))
        e.scatter_add_(1, safe, -w.unsqueeze(1))
        e.addcmul_(e, t.square_(), value=-1.0)
        zc.copy_(e)
    return loss


class _FusedSoftcapCE(torch.autograd.Function):
    """lm_head matmul + soft-cap + CE over row chunks; gradients computed in forward and scaled in
    backward (valid because the output is a scalar reduction)."""

    @staticmethod
    def forward(ctx, h, weight, targets, vocab_size, softcap, reduction, chunk):
        w = weight[:vocab_size].to(h.dtype)
        n_valid = (targets != IGNORE_INDEX).sum().to(torch.float32)
        scale = 1.0 / n_valid.clamp_min(1.0) if reduction == "mean" else torch.ones((), device=h.device)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(weight, dtype=torch.float32)
        gw = grad_w[:vocab_size]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.size(0), chunk):
            hc = h[s:s + chunk]
            dz = hc @ w.t()                                   # logits, then dL/dz in place
            total += _ce_rows(dz, targets[s:s + chunk], softcap, scale).sum()
            torch.mm(dz, w, out=grad_h[s:s + chunk])
            if dz.dtype == torch.float32:
                gw.addmm_(dz.t(), hc)
            else:
                gw.add_(dz.t() @ hc)
        if reduction == "mean":
            total = total / n_valid  # no valid target: 0/0 = nan, like F.cross_entropy
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_out.to(grad_h.dtype), (grad_w * grad_out).to(ctx.weight_dtype),
                None, None, None, None, None)


@torch.compiler.disable  # a graph break: compiled trunk, eager head (its loops would unroll into a huge graph)
def softcap_cross_entropy(h, weight, targets, vocab_size: int, softcap: float, reduction: str = "mean",
                          chunk_rows: int = 2048):
    """Chunked soft-capped cross-entropy of h @ weight[:vocab].T against targets (ignore -1)."""
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        if reduction == "none":
            raise ValueError("fused loss needs a scalar reduction when gradients are required; use 'mean'/'sum'")
        return _FusedSoftcapCE.apply(h, weight, targets, vocab_size, softcap, reduction, chunk_rows)
    w = weight[:vocab_size].to(h.dtype)
    losses = torch.cat([_ce_rows(h[s:s + chunk_rows] @ w.t(), targets[s:s + chunk_rows], softcap, None)
                        for s in range(0, h.size(0), chunk_rows)])
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (targets != IGNORE_INDEX).sum()


# -------------------------------------------------------------------------------------------- cache


class KVCache:
    """Keys/values of every layer, (n_layer, B, max_seq_len, n_kv_head, head_dim), plus the smear state
    (the last token's pre-smear embedding). `pos` = positions filled, the same for every row."""

    def __init__(self, batch_size: int, num_kv_heads: int, head_dim: int, max_seq_len: int, num_layers: int,
                 device, dtype: torch.dtype = torch.float32):
        shape = (num_layers, batch_size, max_seq_len, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self.pos = 0
        self.prev_embedding: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model: GPT, batch_size: int, max_seq_len: int | None = None) -> "KVCache":
        cfg = model.config
        return cls(batch_size, cfg.n_kv_head, cfg.head_dim, max_seq_len or cfg.sequence_len, cfg.n_layer,
                   model.lm_head.weight.device, model.compute_dtype)

    def reset(self) -> None:
        self.pos = 0
        self.prev_embedding = None

    def expand(self, batch_size: int) -> "KVCache":
        """A new cache with this batch-1 cache's contents copied to `batch_size` rows."""
        if self.batch_size != 1:
            raise ValueError(f"expand() needs a batch-1 cache (prefill once), this one has {self.batch_size} rows")
        L, _, T, H, D = self.k.shape
        new = KVCache(batch_size, H, D, T, L, self.k.device, self.k.dtype)
        new.k[:, :, :self.pos] = self.k[:, :, :self.pos]
        new.v[:, :, :self.pos] = self.v[:, :, :self.pos]
        new.pos = self.pos
        if self.prev_embedding is not None:
            new.prev_embedding = self.prev_embedding.expand(batch_size, -1, -1).clone()
        return new


# -------------------------------------------------------------------------------------------- build


def build_model(config: GPTConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                seed: int | None = None, init: bool = True) -> GPT:
    """Build on the meta device, allocate on `device`, initialise (unless init=False, e.g. before
    load_state_dict). dtype: the compute dtype (default: core.common.compute_dtype(device))."""
    from core.common import compute_dtype
    device = torch.device(device)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    if init:
        model.init_weights(seed=seed)
    return model.set_compute_dtype(dtype or compute_dtype(device))
