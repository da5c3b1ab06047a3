"""Ling preset + layout -> Megatron TransformerConfig -> GPTModel (the only model code path)."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ring.models.presets import LingArch
from megatron_ring.models.recompute import recompute_kwargs
from megatron_ring.models.router_replay import ModelRouting
from megatron_ring.models.spec import ling_block_spec, te_by_default
from megatron_ring.platform.layout import Layout

VOCAB_DIVISIBLE_BY = 128


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = VOCAB_DIVISIBLE_BY) -> int:
    """Megatron's rule: pad the vocabulary to a multiple of divisible_by * TP."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def transformer_config(
    arch: LingArch,
    layout: Layout,
    *,
    params_dtype: torch.dtype = torch.float32,
    aux_loss_coeff: float = 0.0,
    z_loss_coeff: float = 0.0,
    use_te: bool = False,
    meta_device: bool = False,
    init_method_std: float = 0.02,
    recompute=None,
) -> TransformerConfig:
    """recompute: the recipe's train.recompute (models/recompute.py); None: none."""
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.moe_ffn_hidden_size,  # unused: every Ling layer is MoE
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        add_bias_linear=False,
        add_qkv_bias=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=init_method_std,
        # Ling's router: linear without bias -> softmax in fp32 -> top-k -> renormalised top-k
        # weights. Megatron's softmax router with pre_softmax=False takes the top-k logits and
        # softmaxes over them, which is the same distribution (p_i / sum_topk p_j).
        num_moe_experts=arch.num_experts,
        moe_router_topk=arch.moe_topk,
        moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=arch.shared_expert_ffn_hidden_size,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=False,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss" if aux_loss_coeff else "none",
        moe_aux_loss_coeff=aux_loss_coeff * _router_loss_tp_factor(layout),
        moe_z_loss_coeff=z_loss_coeff * _router_loss_tp_factor(layout) if z_loss_coeff else None,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=use_te,
        # Losses are token sums divided by the global batch's loss-token count in
        # finalize_model_grads; the router reads this flag at construction to scale its z-loss.
        calculate_per_token_loss=True,
        # Parallelism: experts are not tensor-parallel, so EP ranks span TP x DP.
        tensor_model_parallel_size=layout.tp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=1,
        sequence_parallel=layout.sequence_parallel,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        pipeline_dtype=params_dtype,
        # Fusions that need apex/TE/CUDA kernels stay off without them.
        gradient_accumulation_fusion=False,
        bias_activation_fusion=on_gpu and use_te,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        use_cpu_initialization=not on_gpu or meta_device,
        perform_initialization=not meta_device,
        **recompute_kwargs(recompute, arch.num_layers, use_te),
    )


def _router_loss_tp_factor(layout: Layout) -> int:
    """megatron-core 0.16.1, per-token loss mode, sequence parallel: each TP rank routes a
    disjoint sequence shard and scales its router losses by its own token count, yet the router
    still divides the z-loss by the TP size (and the load-balancing loss, normalised by the
    TP-group token count, shrinks the same way). Both end up weighted 1/TP relative to TP=1.
    Multiplying the coefficients by TP restores layout-independent gradients; the TP
    equivalence tests fail if a Megatron upgrade changes this."""
    return layout.tp


NORM_HEAD_EPS = 1e-7  # added to the column norm, as the official BailingMoe code does


def norm_head_weight(weight: torch.Tensor, true_vocab_size: int) -> torch.Tensor:
    """Ling's norm_head as the official BailingMoe code computes it: every hidden column of the
    output weight [V, H] divided by (its L2 norm over the whole vocabulary + 1e-7), the norm
    detached, so the gradient flows only through the numerator. Under vocab-parallel TP each
    rank holds [V/tp, H]: the column sums of squares are all-reduced over the TP group, and
    Megatron's padded vocabulary rows (past true_vocab_size) are left out of the norm."""
    with torch.no_grad():
        local = weight.shape[0]
        real = min(local, max(0, true_vocab_size - parallel_state.get_tensor_model_parallel_rank() * local))
        acc = torch.promote_types(weight.dtype, torch.float32)  # bf16 weights: the norm in fp32
        squares = torch.linalg.vector_norm(weight[:real], dim=0, dtype=acc).square()
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            torch.distributed.all_reduce(squares, group=parallel_state.get_tensor_model_parallel_group())
        norm = squares.sqrt() + NORM_HEAD_EPS
    return weight / norm.to(weight.dtype)


class NormHeadLinear(tensor_parallel.ColumnParallelLinear):
    """The output layer with norm_head: logits from norm_head_weight(). Adds no state:
    LingModel builds it with GPTModel's arguments and hands it GPTModel's initialised weight."""

    def __init__(self, *args, true_vocab_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.true_vocab_size = true_vocab_size

    def forward(self, input_, weight=None, runtime_gather_output=None):
        weight = norm_head_weight(self.weight if weight is None else weight, self.true_vocab_size)
        return super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)


class LingModel(GPTModel):
    """Megatron's GPTModel with the Ling architecture facts attached."""

    use_te = False  # build_model sets it: packed rows are THD under transformer-engine, a mask otherwise

    def __init__(self, arch: LingArch, config: TransformerConfig, spec, vocab_size: int):
        super().__init__(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=vocab_size,
            max_sequence_length=arch.max_position_embeddings,
            share_embeddings_and_output_weights=False,
            position_embedding_type="rope",
            rotary_percent=1.0,
            rotary_base=arch.rope_theta,
            parallel_output=True,
        )
        self.arch = arch
        if arch.norm_head:
            self.output_layer = self._norm_head_output_layer(self.output_layer.weight)

    def _norm_head_output_layer(self, weight: torch.nn.Parameter) -> NormHeadLinear:
        """GPTModel's output layer (megatron-core 0.16.1 GPTModel.__init__, the same arguments)
        as a NormHeadLinear around GPTModel's own weight Parameter: no allocation, no
        initialisation, no RNG draw, so the model is bit-identical to one without norm_head."""
        layer = NormHeadLinear(
            self.config.hidden_size,
            self.vocab_size,
            config=self.config,
            init_method=self.config.init_method,
            bias=False,
            skip_bias_add=False,
            gather_output=not self.parallel_output,
            skip_weight_param_allocation=True,  # the weight is GPTModel's, below
            embedding_activation_buffer=self.embedding_activation_buffer,
            grad_output_buffer=self.grad_output_buffer,
            tp_group=self.pg_collection.tp,
            true_vocab_size=self.arch.vocab_size,
        )
        layer.weight = weight
        return layer

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None, packed_seq_params=None) -> torch.Tensor:
        """The final (normed) hidden states [s, b, h] (with sequence parallelism this rank's
        [s/tp, b, h] block) that forward() turns into logits: megatron-core 0.16.1
        GPTModel.forward up to the output layer (_preprocess, then the decoder), training and
        plain evaluation only (no inference context or MTP); packed_seq_params: THD rows under
        transformer-engine (models/packed_docs.py). The losses take
        these and output_weight() to ops.logprob_entropy instead of [b, s, V] logits;
        tests/test_model.py checks forward() == hidden_states() @ output_weight().T."""
        if self.mtp_process or not (self.pre_process and self.post_process):
            raise NotImplementedError("hidden_states: one pipeline stage without MTP only")
        if self.config.fine_grained_activation_offloading:
            self.preprocess_for_fine_grained_offloading()
        pre = self._preprocess(input_ids=input_ids, position_ids=position_ids, packed_seq_params=packed_seq_params)
        decoder_input, rotary_pos_emb, rotary_pos_cos, rotary_pos_sin, sequence_len_offset, padding_mask = pre[:6]
        return self.decoder(
            hidden_states=decoder_input,
            attention_mask=attention_mask,
            rotary_pos_emb=rotary_pos_emb,
            rotary_pos_cos=rotary_pos_cos,
            rotary_pos_sin=rotary_pos_sin,
            rotary_pos_cos_sin=pre[6] if len(pre) == 7 else None,
            sequence_len_offset=sequence_len_offset,
            padding_mask=padding_mask,
            packed_seq_params=packed_seq_params,
        )

    def output_weight(self) -> torch.Tensor:
        """The local vocab shard of the weight the logits are computed from."""
        w = self.output_layer.weight
        return norm_head_weight(w, self.arch.vocab_size) if self.arch.norm_head else w


def build_model(
    arch: LingArch,
    layout: Layout,
    *,
    params_dtype: torch.dtype = torch.float32,
    aux_loss_coeff: float = 0.0,
    z_loss_coeff: float = 0.0,
    use_te: bool | None = None,
    meta_device: bool = False,
    recompute=None,
) -> LingModel:
    """Build the local shard of the model. Model-parallel state must be initialised first
    (platform.distributed.init, which also applies platform/cpu_compat.py's stand-ins)."""
    if use_te is None:
        use_te = te_by_default()
    config = transformer_config(
        arch, layout, params_dtype=params_dtype, aux_loss_coeff=aux_loss_coeff,
        z_loss_coeff=z_loss_coeff, use_te=use_te, meta_device=meta_device, recompute=recompute,
    )
    vocab = padded_vocab_size(arch.vocab_size, layout.tp)
    ctx = torch.device("meta") if meta_device else contextlib.nullcontext()
    with ctx:
        model = LingModel(arch, config, ling_block_spec(arch, use_te=use_te), vocab)
    model.use_te = use_te
    model.routing = ModelRouting(model)  # the routers' replay slots (models/router_replay.py)
    if torch.cuda.is_available() and not meta_device:
        model.cuda(torch.cuda.current_device())  # as Megatron's get_model: any layer built on the CPU
    _mark_expert_params(model)
    return model


def _mark_expert_params(model: LingModel) -> None:
    """Reduce routed-expert gradients over the expert-data-parallel group at every EP size.

    Megatron marks expert weights allreduce=False (expert-DP reduction) only when EP > 1. With
    expert_tensor_parallel_size=1 and TP > 1, experts are replicated over the TP ranks, each of
    which routes its own sequence shard, so even at EP = 1 their gradients must be summed over
    the expert-DP group (which spans those TP ranks), not the dense DP group.
    """
    for name, param in model.named_parameters():
        if ".mlp.experts." in name:
            param.allreduce = False
