"""Per-GPU memory of a recipe before it runs (`megatron-ring plan`, and every --dry-run): what
the trainer holds (weights, fp32 gradient buffers, the distributed optimizer's shard, the RL
reference), the activations of the largest micro-batch with the recipe's recompute, the loss
op's working memory, and, colocated, the rollout engine's share, per phase of a step.

Every figure is counted from the code that allocates it (megatron-core 0.16.1, the layer specs of
models/spec.py, ops/logprob_entropy.py); tests/test_memory_plan.py checks weights, gradients and
optimizer against the bytes ling-tiny really allocates, and the activations against the peak
torch's profiler measures (tools/bench_memory_plan.py prints both). GB here is 1e9 bytes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

GB = 1e9
PROMPT_TOKENS = 1024  # RL: the prompt part of the longest segment (the context clamps the sum)
RUNTIME_GB = 3.0  # GPU: CUDA contexts, NCCL buffers, what an engine keeps besides its pool (README)
SGLANG_MEM_FRACTION = 0.88  # SGLang's --mem-fraction-static when the recipe gives none
PARAM_ALIGN = 64  # Megatron's DDP buffer: every param starts 64 elements aligned (distributed optimizer)


# ---------------------------------------------------------------------------- the model's tensors


def local_params(arch, tp: int, ep: int, vocab_padded: int) -> tuple[list[int], list[int]]:
    """Element counts of one rank's parameter tensors: (dense, routed experts), as build_model
    makes them (Megatron's GPTModel with Ling's spec; experts not tensor-parallel)."""
    h, d, L = arch.hidden_size, arch.head_dim, arch.num_layers
    qkv = (arch.num_attention_heads + 2 * arch.num_query_groups) * d
    layer = [h, qkv * h // tp, arch.num_attention_heads * d * h // tp, h, arch.num_experts * h,
             2 * arch.shared_expert_ffn_hidden_size * h // tp, arch.shared_expert_ffn_hidden_size * h // tp]
    dense = [vocab_padded // tp * h] + layer * L + [h, vocab_padded // tp * h]
    f = arch.moe_ffn_hidden_size
    experts = [2 * f * h, f * h] * (arch.num_experts // ep) * L
    return dense, experts


def ddp_buffer_numel(numels: list[int], dp: int) -> int:
    """Elements of one Megatron DDP param/grad buffer with the distributed optimizer (one bucket:
    overlap_grad_reduce is off): each param 64-aligned, the end padded to lcm(dp, 128)."""
    end = 0
    for i, n in enumerate(numels):
        end = (math.ceil(end / PARAM_ALIGN) * PARAM_ALIGN if i else 0) + n
    div = math.lcm(dp, 128)
    return math.ceil(end / div) * div


def padded_vocab(arch, tp: int) -> int:
    """models.builder.padded_vocab_size (Megatron's rule), without importing torch."""
    multiple = 128 * tp
    return math.ceil(arch.vocab_size / multiple) * multiple


def state_bytes(arch, layout, param_bytes: int) -> dict[str, int]:
    """What the trainer's model, DDP and distributed optimizer allocate on one rank: params (the
    DDP param buffers they live in), fp32 grad buffers (grad_reduce_in_fp32), and the optimizer
    shard: Adam's m and v in fp32, plus fp32 main params when params are not fp32 (with fp32
    params Megatron's shard is a view of the weights)."""
    dense, experts = local_params(arch, layout.tp, layout.ep, padded_vocab(arch, layout.tp))
    expert_dp = layout.world_size // layout.ep
    buffers = [(ddp_buffer_numel(dense, layout.dp), sum(dense), layout.dp),
               (ddp_buffer_numel(experts, expert_dp), sum(experts), expert_dp)]
    per_elem = 8 + (4 if param_bytes < 4 else 0)
    return {"params": sum(n for n, _, _ in buffers) * param_bytes, "grads": sum(n for n, _, _ in buffers) * 4,
            "optimizer": int(sum(u / dp for _, u, dp in buffers) * per_elem)}


def reference_bytes(arch, layout, param_bytes: int) -> int:
    """The frozen reference: a plain model, each parameter its own allocation."""
    dense, experts = local_params(arch, layout.tp, layout.ep, padded_vocab(arch, layout.tp))
    return (sum(dense) + sum(experts)) * param_bytes


# ---------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class Shape:
    """One micro-batch on one rank: T tokens in rows of s (attention spans s), a bytes an
    activation element, TP/SP, the layer spec (te: transformer-engine's fused attention and
    grouped experts on GPU; else the local spec on CPU)."""

    tokens: int
    seq: int
    act_bytes: int
    tp: int
    te: bool


def _layer_terms(arch, m: Shape, rc) -> tuple[dict, int]:
    """Bytes one transformer layer keeps for backward (by part) and the extra it allocates during
    its backward, with the recompute setting rc (None, or granularity/modules/num_layers)."""
    h, d, a, tp = arch.hidden_size, arch.head_dim, m.act_bytes, m.tp
    nq, nkv, k, E = arch.num_attention_heads, arch.num_query_groups, arch.moe_topk, arch.num_experts
    F, Fs = arch.moe_ffn_hidden_size, arch.shared_expert_ffn_hidden_size
    T, Tsp, rows = m.tokens, m.tokens / tp, m.tokens / m.seq
    mods = set(rc.modules) if rc is not None and rc.granularity == "selective" else set()
    # RMSNorm: input (fp32 in the local norm), 1/rms (fp32), output; fused TE norms keep the input.
    norm_full = Tsp * (2 * a * h + 4) if m.te else Tsp * (4 * h + 4 + 2 * a * h)
    norm_ckpt = Tsp * a * h  # layernorm recompute keeps only the input
    qkv = T * (nq + 2 * nkv) * d * a / tp
    if m.te:  # fused attention: q, k, v, output and the softmax log-sum-exp
        attn = qkv + T * nq * d * a / tp + T * nq / tp * 4
        attn_bwd = qkv
        attn_ckpt = qkv + T * nq * d * a / tp
    else:  # local: q, k and v expanded to every head, fp32 probabilities (+ their cast), causal mask
        probs = rows * nq / tp * m.seq ** 2
        attn = 3 * T * nq * d * a / tp + probs * (4 + (2 if a < 4 else 0)) + m.seq ** 2 + T * nq * d * a / tp
        attn_bwd = probs * 8  # gradient of the probabilities and of the scores
        attn_ckpt = qkv + T * nq * d * a / tp  # the checkpoint keeps q, k, v; linear_proj its input
    rope = 4 * m.seq * rows * d * a  # cos and sin for q and k
    router = Tsp * (E * 5 + k * 20)  # fp32 scores, routing map, top-k indices and weights
    shared = T * Fs * a / tp * (3 if m.te else 5)  # fc1 output (2F), activation, fc2 input
    per_row = (h * a + 3 * F * a + 12) if m.te else (h * a + 6 * F * a + 12)
    if m.te and "moe_act" in mods:
        per_row -= F * a  # fc2's input is recomputed from fc1's output
    experts = Tsp * k * per_row  # dispatched rows: tokens x top-k (balanced routing assumed)
    terms = {
        "norms": 2 * (norm_ckpt if "layernorm" in mods else norm_full),
        "attention": (attn_ckpt if "core_attn" in mods else attn) + rope,
        "router": 0 if "moe" in mods else router,
        "shared_experts": 0 if mods & {"moe", "shared_experts"} else shared,
        "experts": 0 if "moe" in mods else experts,
    }
    if m.te and "layernorm" in mods:
        terms["norms"] = norm_full + norm_ckpt  # the TE spec fuses the input norm into linear_qkv
    recomputed = 0  # what a selective checkpoint rebuilds during this layer's backward
    if "core_attn" in mods:
        recomputed += attn - attn_ckpt
    if "moe" in mods:
        recomputed += router + experts + shared
    elif "shared_experts" in mods:
        recomputed += shared
    backward = recomputed + attn_bwd + 2 * Tsp * h * a
    return terms, int(backward)


def _loss_terms(arch, m: Shape, vocab_local: int) -> tuple[int, int]:
    """ops/logprob_entropy.py on this micro-batch: (what it keeps for backward, the most it
    allocates at once: the backward's dh, dw and logits blocks)."""
    from megatron_ring.ops import c3po_loss_torch, c3po_loss_triton

    h, a, T = arch.hidden_size, m.act_bytes, m.tokens
    saved = T * h * a + T * 8  # every token's hidden (gathered under SP), lse and E_p[z]
    if m.te:  # Triton: dz blocks in the input dtype, fp32 chunk accumulator for a non-fp32 weight
        ct, cv = min(c3po_loss_triton.CHUNK_TOKENS, T), min(c3po_loss_triton.CHUNK_VOCAB, vocab_local)
        blocks, copy = ct * cv * a, 0
    else:  # torch: fp32 logits and probabilities, one block each; fp32 copy of a bf16 hidden
        ct, cv = min(c3po_loss_torch.CHUNK_TOKENS, T), min(c3po_loss_torch.CHUNK_VOCAB, vocab_local)
        blocks, copy = 2 * ct * cv * 4, (T * h * 4 if a < 4 else 0)
    acc = cv * h * 4 if a < 4 else 0
    working = T * h * 4 + vocab_local * h * a + acc + blocks + copy + T * h * a
    return saved, working


def activation_bytes(arch, m: Shape, rc, vocab_local: int, forward_only: bool = False) -> dict:
    """Peak bytes of one forward+backward (or one no-grad forward) of a micro-batch, by part."""
    terms, layer_bwd = _layer_terms(arch, m, rc)
    layer = sum(terms.values())
    L, h, a, Tsp = arch.num_layers, arch.hidden_size, m.act_bytes, m.tokens / m.tp
    final_norm = Tsp * (2 * a * h + 4) if m.te else Tsp * (4 * h + 4 + 2 * a * h)
    loss_saved, loss_work = _loss_terms(arch, m, vocab_local)
    if forward_only:  # one layer's tensors at a time, then the loss's forward blocks
        return {"layers": int(layer + 2 * Tsp * h * a), "loss_working": int(loss_work - m.tokens * h * 4)}
    if rc is not None and rc.granularity == "full":
        n = rc.num_layers
        kept = L // n * Tsp * h * a  # each block's input
        peak_bwd = n * layer + layer_bwd  # one block rebuilt during its backward
    else:
        kept, peak_bwd = L * layer, layer_bwd
    out = {"layers": int(kept + final_norm + m.tokens * 8), "loss_saved": int(loss_saved)}
    # The loss's backward runs with everything kept; a layer's backward after the loss is gone.
    out["backward_peak"] = int(max(loss_work, peak_bwd))
    return out


# ---------------------------------------------------------------------------- the plan


@dataclass
class MemoryPlan:
    recipe_name: str
    gpu_memory_gb: float
    tokens: int  # the largest micro-batch
    components: dict[str, float]  # GB
    phases: dict[str, dict[str, float]] = field(default_factory=dict)  # phase -> {component: GB, total_gb}
    notes: list[str] = field(default_factory=list)

    @property
    def total_gb(self) -> float:
        return max(p["total_gb"] for p in self.phases.values())

    def as_json(self) -> dict:
        return {"recipe": self.recipe_name, "gpu_memory_gb": self.gpu_memory_gb, "micro_batch_tokens": self.tokens,
                **{k: round(v, 3) for k, v in self.components.items()}, "total_gb": round(self.total_gb, 3),
                "phases": {n: {k: round(v, 3) for k, v in p.items()} for n, p in self.phases.items()},
                "notes": self.notes}

    def table(self) -> str:
        names = list(self.phases)
        keys = list(self.components)
        lines = [f"memory plan, per GPU (GB = 1e9 bytes): {self.recipe_name}, largest micro-batch {self.tokens} tokens",
                 f"{'':28s}" + "".join(f"{n:>12s}" for n in names)]
        for k in keys:
            lines.append(f"{k:28s}" + "".join(f"{self.phases[n].get(k, 0.0):12.2f}" for n in names))
        lines.append(f"{'total':28s}" + "".join(f"{self.phases[n]['total_gb']:12.2f}" for n in names))
        verdict = "fits" if self.total_gb <= self.gpu_memory_gb else "EXCEEDS"
        lines.append(f"peak {self.total_gb:.2f} GB: {verdict} cluster.gpu_memory_gb {self.gpu_memory_gb:g}")
        return "\n".join(lines + [f"# {n}" for n in self.notes])

    def check(self) -> None:
        if self.total_gb > self.gpu_memory_gb:
            raise ValueError(f"{self.recipe_name}: the memory plan's peak {self.total_gb:.1f} GB per GPU exceeds "
                             f"cluster.gpu_memory_gb {self.gpu_memory_gb:g} (see `megatron-ring plan`; "
                             "train.recompute, train.micro_batch or train.max_tokens_per_micro_batch lower it)")


def _dtype_bytes(recipe) -> int:
    """train.dtype as stage_setup.params_dtype resolves it, for the recipe's accelerator."""
    want = recipe.train.dtype
    if want == "auto":
        want = "bf16" if recipe.cluster.accelerator == "gpu" else "fp32"
    return 2 if want == "bf16" else 4


def micro_batch_shape(recipe, layout, te: bool, act_bytes: int, prompt_tokens: int = PROMPT_TOKENS) -> Shape:
    """The largest micro-batch: distill, micro_batch rows of data.seq_length; RL, micro_batch
    segments of prompt + rollout.max_new_tokens (at most the context). A token cap
    (train.max_tokens_per_micro_batch) bounds it, except a row longer than the cap goes alone."""
    t = recipe.train
    if recipe.stage == "rl":
        context = recipe.rollout.context_length or recipe.model.arch().max_position_embeddings
        seq = min(context, prompt_tokens + recipe.rollout.max_new_tokens)
    else:
        seq = recipe.data.seq_length
    seq = math.ceil(seq / layout.tp) * layout.tp  # padded to TP's sequence split
    tokens = max(t.max_tokens_per_micro_batch, seq) if t.max_tokens_per_micro_batch else t.micro_batch * seq
    return Shape(tokens=tokens, seq=seq, act_bytes=act_bytes, tp=layout.tp, te=te)


def _engine_gb(recipe) -> tuple[float, str]:
    args = [str(a) for a in recipe.rollout.server_args]
    frac = SGLANG_MEM_FRACTION
    for i, a in enumerate(args):
        if a.startswith("--mem-fraction-static"):
            frac = float(a.split("=", 1)[1] if "=" in a else args[i + 1])
    return frac * recipe.cluster.gpu_memory_gb, (f"rollout engine: --mem-fraction-static {frac:g} of "
                                                 f"{recipe.cluster.gpu_memory_gb:g} GB (weights + KV cache)")


def plan(recipe, layout=None, prompt_tokens: int = PROMPT_TOKENS) -> MemoryPlan:
    """The plan of a distill or RL recipe at its own layout (recipe.schema.check_layout)."""
    from megatron_ring.models.recompute import recompute_kwargs
    from megatron_ring.recipe.schema import check_layout

    layout = layout or check_layout(recipe)
    arch, gpu = recipe.model.arch(), recipe.cluster.accelerator == "gpu"
    te = gpu  # the GPU image carries transformer-engine: fused attention, grouped experts
    rc = recipe.train.recompute
    recompute_kwargs(rc, arch.num_layers, te)  # refused settings are refused here too
    a = _dtype_bytes(recipe)
    vocab = padded_vocab(arch, layout.tp)
    c = {k: v / GB for k, v in state_bytes(arch, layout, a).items()}
    expert_dp = layout.world_size // layout.ep
    rl = recipe.stage == "rl"
    c["reference"] = reference_bytes(arch, layout, a) / GB if rl and recipe.rl.kl_beta > 0 else 0.0
    shape = micro_batch_shape(recipe, layout, te, a, prompt_tokens)
    act = activation_bytes(arch, shape, rc, vocab // layout.tp)
    _, loss_work = _loss_terms(arch, shape, vocab // layout.tp)
    loss_peak = act["backward_peak"] == loss_work  # the loss's backward is the step's peak
    c["activations"] = (act["layers"] + act["loss_saved"] + (0 if loss_peak else act["backward_peak"])) / GB
    c["loss_working"] = loss_work / GB if loss_peak else 0.0
    c["runtime"] = RUNTIME_GB if gpu else 0.0
    notes = [f"layer spec: {'transformer-engine (fused attention, grouped experts)' if te else 'local (CPU)'}; "
             f"activations {'bf16' if a == 2 else 'fp32'}; recompute {rc.granularity}"
             + (f" {rc.modules}" if rc.granularity == "selective" else
                f" every {rc.num_layers} layer(s)" if rc.granularity == "full" else ""),
             f"optimizer shard over DP {layout.dp} (dense) and expert-DP {expert_dp} (experts)"]
    if rl:
        notes.append(f"RL segment: prompt up to {prompt_tokens} + rollout.max_new_tokens {recipe.rollout.max_new_tokens}, "
                     f"at most the context: {shape.seq} tokens")
    update = {k: c[k] for k in ("params", "grads", "optimizer", "activations", "loss_working", "runtime")}
    phases = {}
    if rl:
        fwd = activation_bytes(arch, shape, None, vocab // layout.tp, forward_only=True)
        logprob = {k: c[k] for k in ("params", "grads", "optimizer", "runtime")}
        logprob["reference"] = c["reference"]
        logprob["activations"] = fwd["layers"] / GB
        logprob["loss_working"] = fwd["loss_working"] / GB
        update["reference"] = 0.0 if recipe.rl.reference_offload else c["reference"]
        if recipe.colocated:
            engine_gb, line = _engine_gb(recipe)
            notes.append(line)
            c["rollout_engine"] = engine_gb
            rollout = {"params": c["params"], "rollout_engine": engine_gb, "runtime": c["runtime"]}
            if not recipe.offload:  # nothing leaves: the engine and the trainer share the GPU throughout
                for ph in (logprob, update):
                    ph["rollout_engine"] = engine_gb
                rollout.update(grads=c["grads"], optimizer=c["optimizer"], reference=c["reference"])
            else:
                notes.append("rollout.offload: gradients, optimizer and reference wait in host memory during "
                             "rollouts; the engines release weights and KV cache during training")
            phases["rollout"] = rollout
        phases["logprob"] = logprob
    phases["update"] = update
    for p in phases.values():
        p["total_gb"] = sum(p.values())
    return MemoryPlan(recipe.name, recipe.cluster.gpu_memory_gb, shape.tokens, c, phases, notes)
