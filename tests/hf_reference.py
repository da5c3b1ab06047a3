"""Test oracle: plain-PyTorch forward pass of a Hugging Face BailingMoeForCausalLM
(Ling-lite, model_type "bailing_moe") computed directly from its HF-named weights.

Written independently from the architecture description (pre-norm decoder with fused
QKV attention + rotate-half RoPE + GQA, and a top-k softmax-routed SwiGLU MoE with
shared experts in every layer). It deliberately imports nothing from megatron_ring or
megatron, so tests can compare the Megatron-Core implementation's logits against it.
Everything is computed in float32; it is simple, not fast.
"""

import math

import torch
import torch.nn.functional as F


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight.float() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _swiglu(x: torch.Tensor, sd: dict, prefix: str) -> torch.Tensor:
    gate = x @ sd[f"{prefix}.gate_proj.weight"].float().T
    up = x @ sd[f"{prefix}.up_proj.weight"].float().T
    return (F.silu(gate) * up) @ sd[f"{prefix}.down_proj.weight"].float().T


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _attention(x: torch.Tensor, sd: dict, prefix: str, cfg: dict) -> torch.Tensor:
    B, S, _ = x.shape
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // nh
    qkv = x @ sd[f"{prefix}.query_key_value.weight"].float().T
    q, k, v = torch.split(qkv, [nh * hd, nkv * hd, nkv * hd], dim=-1)
    q = q.view(B, S, nh, hd).transpose(1, 2)  # [B, nh, S, hd]
    k = k.view(B, S, nkv, hd).transpose(1, 2)
    v = v.view(B, S, nkv, hd).transpose(1, 2)

    inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    freqs = torch.outer(torch.arange(S, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()  # [S, hd], broadcast over B and heads
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin

    group = nh // nkv  # query head h uses kv head h // group
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)

    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    out = (probs @ v).transpose(1, 2).reshape(B, S, nh * hd)
    return out @ sd[f"{prefix}.dense.weight"].float().T


def _moe(x: torch.Tensor, sd: dict, prefix: str, cfg: dict) -> torch.Tensor:
    shape = x.shape
    x = x.reshape(-1, shape[-1])  # [T, hidden]
    logits = x @ sd[f"{prefix}.gate.weight"].float().T  # [T, num_experts]
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    topk_w, topk_idx = torch.topk(probs, cfg["num_experts_per_tok"], dim=-1)
    if cfg["norm_topk_prob"]:
        topk_w = topk_w / topk_w.sum(dim=-1, keepdim=True)

    out = torch.zeros_like(x)
    for e in range(cfg["num_experts"]):
        token_idx, slot = torch.nonzero(topk_idx == e, as_tuple=True)
        if token_idx.numel() == 0:
            continue
        y = _swiglu(x[token_idx], sd, f"{prefix}.experts.{e}")
        out.index_add_(0, token_idx, y * topk_w[token_idx, slot].unsqueeze(-1))

    if cfg.get("num_shared_experts", 0) > 0:
        out = out + _swiglu(x, sd, f"{prefix}.shared_experts")
    return out.view(shape)


def norm_head(w: torch.Tensor, rows: bool = False) -> torch.Tensor:
    """BailingMoe's norm_head, written from its definition: lm_head.weight [V, H] divided by
    (torch.norm(w, p=2, dim=0, keepdim=True) + 1e-7).detach(), i.e. every hidden column by its L2
    norm over the vocabulary, the norm carrying no gradient. rows=True is the earlier, wrong
    reading (each vocabulary row normalised), kept so a test can show it is told apart."""
    if rows:
        return F.normalize(w, dim=1)
    return w / (torch.norm(w, p=2, dim=0, keepdim=True) + 1e-7).detach()


def hf_forward(state_dict: dict[str, torch.Tensor], config: dict, input_ids: torch.Tensor,
               grad: bool = False, norm_head_rows: bool = False) -> torch.Tensor:
    """input_ids [B, S] int64 -> logits [B, S, vocab_size] in float32. Causal attention, positions 0..S-1 for every row.
    grad: keep the autograd graph (gradient oracles), else no_grad."""
    if config.get("first_k_dense_replace", 0) != 0:
        raise NotImplementedError("hf_reference only supports first_k_dense_replace == 0")
    sd, eps = state_dict, config["rms_norm_eps"]
    with torch.set_grad_enabled(grad):
        h = sd["model.word_embeddings.weight"].float()[input_ids]
        for i in range(config["num_hidden_layers"]):
            p = f"model.layers.{i}"
            x = _rms_norm(h, sd[f"{p}.input_layernorm.weight"], eps)
            h = h + _attention(x, sd, f"{p}.attention", config)
            x = _rms_norm(h, sd[f"{p}.post_attention_layernorm.weight"], eps)
            h = h + _moe(x, sd, f"{p}.mlp", config)
        h = _rms_norm(h, sd["model.norm.weight"], eps)
        w = sd["lm_head.weight"].float()
        if config.get("norm_head", False):
            w = norm_head(w, rows=norm_head_rows)
        return h @ w.T
