"""A small GPT: decoder-only transformer with explicit causal self-attention (nanoGPT-style).

Attention is written out — q/k/v projections and softmax(q kᵀ/√d_h) — rather than calling
``F.scaled_dot_product_attention``, so double backward and forward-mode AD work and the
pre-softmax attention logits can be observed: every attention module applies
``logits_hook = nn.Identity()`` to its logits, so a forward hook on ``blocks.<i>.attn.logits_hook``
sees them (B, n_head, T, T) at no cost when no hook is set.

Instability switches (Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer training
instabilities", arXiv 2309.14322): ``qk_layernorm`` puts a LayerNorm
on every head's queries and keys before the dot product; ``z_loss`` is the coefficient of the
auxiliary loss z_loss·(log Z)² per token (1e-4 in PaLM), which a training loop adds via
:meth:`GPT.z_loss_penalty`. Pre-LN blocks, learned position embeddings, no weight tying.

Embedding switches (Takase, Kiyono, Kobayashi, Suzuki 2023, "Spike No More: Stabilizing the Pre-training
of Large Language Models", arXiv 2312.16903): the input of the first block is
x₀ = s·(E[idx] + P[pos]) with s = √n_embd when ``scaled_embed`` (Scaled Embed, else s = 1), then
LayerNorm(x₀) when ``emb_layernorm`` (Embed LN); ``emb_std`` is the init standard deviation of E and P
(default 0.02, nanoGPT) and ``init_std`` that of every other Linear weight (default 0.02). Takase et al.
show pre-training is stable when std(x₀) ≈ 1 and the sub-layer weights are small
(std ≤ √(2/(5d)), "small init"): e.g. ``scaled_embed=True, emb_std=√(2/(5d))`` gives std(x₀) ≈ √(2/5) ≈ 0.63
instead of 0.02·√2 ≈ 0.03.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from lossatlas.models.registry import register_model


@dataclass(frozen=True)
class GPTConfig:
    """The hyper-parameters that rebuild a GPT (stored as ``model.config``)."""

    vocab_size: int = 64
    block_size: int = 32
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0
    bias: bool = True
    qk_layernorm: bool = False
    z_loss: float = 0.0
    last_token_only: bool = False
    scaled_embed: bool = False
    emb_layernorm: bool = False
    emb_std: float = 0.02
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for field in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if int(getattr(self, field)) <= 0:
                raise ValueError(f"GPT {field} must be a positive integer, got {getattr(self, field)!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if self.z_loss < 0:
            raise ValueError(f"z_loss is a non-negative coefficient, got {self.z_loss}")
        for field in ("emb_std", "init_std"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"GPT {field} must be a positive finite standard deviation, got {value!r}")


class CausalSelfAttention(nn.Module):
    """softmax(mask(q kᵀ/√d_h)) v per head, then an output projection; q, k optionally LayerNormed."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.q_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.k_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.v_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.out_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        # qk-layernorm: one LayerNorm over the head dimension, shared by the heads of this layer.
        self.q_ln = nn.LayerNorm(self.head_dim) if config.qk_layernorm else None
        self.k_ln = nn.LayerNorm(self.head_dim) if config.qk_layernorm else None
        self.logits_hook = nn.Identity()  # forward hooks here see the pre-softmax logits
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        mask = torch.tril(torch.ones(config.block_size, config.block_size, dtype=torch.bool))
        self.register_buffer("causal_mask", mask.view(1, 1, config.block_size, config.block_size), persistent=False)

    def _heads(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        return x.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, C) attention output of (B, T, C) activations, each position attending to itself and earlier ones."""
        B, T, C = x.shape
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        if self.q_ln is not None:
            q, k = self.q_ln(q), self.k_ln(k)
        logits = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, nh, T, T)
        # The hook sees every entry; those above the diagonal (future keys) are masked next.
        logits = self.logits_hook(logits)
        logits = logits.masked_fill(~self.causal_mask[:, :, :T, :T], float("-inf"))
        att = self.attn_dropout(torch.softmax(logits, dim=-1))
        y = (att @ v).transpose(1, 2).reshape(B, T, C)  # (B, T, C): heads side by side
        return self.resid_dropout(self.out_proj(y))


class FeedForward(nn.Module):
    """Linear(C → 4C) → GELU → Linear(4C → C)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.act = nn.GELU()
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, C) → (B, T, C), position by position."""
        return self.dropout(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = FeedForward(config)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, C) → (B, T, C) through both residual branches."""
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token + position embeddings → n_layer pre-LN blocks → final LayerNorm → LM head.

    forward(idx (B, T) long) → logits (B, T, V), or (B, V) for the last position when
    ``last_token_only`` (classification tasks such as modular arithmetic, whose answer follows the last token "=").
    Init as nanoGPT: Linear weights N(0, init_std), embeddings N(0, emb_std), residual output projections
    N(0, init_std/√(2·n_layer)) (defaults 0.02). The first block sees s·(E[idx] + P[pos]), s = √n_embd with
    ``scaled_embed`` (else 1), LayerNormed with ``emb_layernorm`` (Takase et al. 2023, "Spike No More").
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.z_loss = float(config.z_loss)
        self.last_token_only = bool(config.last_token_only)
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        # Scaled Embed multiplies the embeddings by √d; Embed LN normalises them (Takase et al. 2023)
        self.emb_scale = math.sqrt(config.n_embd) if config.scaled_embed else 1.0
        self.emb_ln = nn.LayerNorm(config.n_embd, bias=config.bias) if config.emb_layernorm else None
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("attn.out_proj.weight") or name.endswith("mlp.proj.weight"):
                nn.init.normal_(p, mean=0.0, std=config.init_std / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.emb_std)
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor) -> Tensor:
        """Logits (B, T, V) of token ids (B, T), or (B, V) at the last position when ``last_token_only``."""
        if idx.ndim != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"GPT expects token ids (B, T) of dtype long, got {tuple(idx.shape)} {idx.dtype}")
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}; build with a larger block_size")
        pos = torch.arange(T, device=idx.device)
        x = (self.tok_emb(idx) + self.pos_emb(pos)) * self.emb_scale  # (B, T, C); s = √C with scaled_embed
        if self.emb_ln is not None:
            x = self.emb_ln(x)  # Embed LN: std ≈ 1 per position
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        if self.last_token_only:
            x = x[:, -1, :]  # (B, C)
        return self.lm_head(x)  # (B, T, V) or (B, V)

    def z_loss_penalty(self, logits: Tensor) -> Tensor:
        """z_loss · mean over tokens of (log Z)², Z = Σ_v exp(logit_v) (PaLM, Chowdhery et al. 2022)."""
        log_z = torch.logsumexp(logits, dim=-1)
        return self.z_loss * (log_z**2).mean()

    def extra_repr(self) -> str:
        """The config's fields, shown in ``repr(model)``."""
        return ", ".join(f"{k}={v}" for k, v in asdict(self.config).items())


@register_model("gpt")
def build_gpt(
    vocab_size: int = 64,
    block_size: int = 32,
    n_layer: int = 2,
    n_head: int = 4,
    n_embd: int = 64,
    dropout: float = 0.0,
    bias: bool = True,
    qk_layernorm: bool = False,
    z_loss: float = 0.0,
    last_token_only: bool = False,
    scaled_embed: bool = False,
    emb_layernorm: bool = False,
    emb_std: float = 0.02,
    init_std: float = 0.02,
) -> GPT:
    """The small GPT; defaults match the ``token_stream`` data (vocab 64, block 32), ≈110k parameters.

    ``scaled_embed``/``emb_layernorm``/``emb_std``/``init_std``: the embedding scale √n_embd, Embed LN and the
    init standard deviations of Takase et al. 2023 ("Spike No More"); defaults leave the nanoGPT model unchanged.
    """
    return GPT(GPTConfig(vocab_size, block_size, n_layer, n_head, n_embd, dropout, bias, qk_layernorm, z_loss, last_token_only,
                         scaled_embed, emb_layernorm, emb_std, init_std))
