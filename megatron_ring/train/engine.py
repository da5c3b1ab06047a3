"""Megatron's own DDP, distributed optimizer, scheduler and forward-backward schedule, and the SFT loss.

The loss is a sum over tokens divided by the number of loss tokens in the whole global batch
(Megatron's calculate_per_token_loss mode): every micro-batch returns (sum, count), DDP sums
gradients over data-parallel ranks, and finalize_model_grads divides by the all-reduced count.
That keeps a token's weight independent of how the batch was split over ranks and micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_ring.ops import logprob_entropy
from megatron_ring.platform.distributed import to_device
from megatron_ring.models.lm_head import flat, head_args, hidden_tokens, unwrap


@dataclass
class Batch:
    """One micro-batch: tokens, next-token labels, and which labels carry loss. Packed rows add
    per-document positions and document ids (-1: padding), which attention turns into a mask or
    THD boundaries (models/packed_docs.py); plain rows are causal."""

    input_ids: torch.Tensor  # [b, s]
    labels: torch.Tensor  # [b, s]
    loss_mask: torch.Tensor  # [b, s] float
    position_ids: torch.Tensor | None = None
    doc_ids: torch.Tensor | None = None  # [b, s]

    def positions(self) -> torch.Tensor:
        if self.position_ids is not None:
            return self.position_ids
        b, s = self.input_ids.shape
        return torch.arange(s, device=self.input_ids.device).unsqueeze(0).expand(b, s)


def wrap_ddp(model, use_distributed_optimizer: bool = True) -> DistributedDataParallel:
    assert model.config.calculate_per_token_loss, "build the model with build_model()"
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    ddp = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp.no_sync
    return ddp


def build_optimizer(ddp, *, lr: float, min_lr: float = 0.0, weight_decay: float = 0.1, clip_grad: float = 1.0,
                    adam_beta1: float = 0.9, adam_beta2: float = 0.95, use_distributed_optimizer: bool = True):
    """AdamW (Megatron's "adam" is decoupled weight decay). min_lr goes into every parameter
    group, where the scheduler reads it."""
    config = OptimizerConfig(
        optimizer="adam", lr=lr, min_lr=min_lr, weight_decay=weight_decay, adam_beta1=adam_beta1, adam_beta2=adam_beta2,
        clip_grad=clip_grad, bf16=ddp.config.bf16, params_dtype=ddp.config.params_dtype,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    return get_megatron_optimizer(config, [ddp])


def build_scheduler(optimizer, *, lr: float, total_steps: int, warmup_steps: int = 0,
                    style: str = "constant", min_lr: float = 0.0, weight_decay: float = 0.1):
    """Megatron's scheduler: sets lr each step and applies each group's lr/wd multipliers
    (norms get wd_mult 0, which nothing applies without it)."""
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup_steps else lr, max_lr=lr, min_lr=min_lr,
        lr_warmup_steps=warmup_steps, lr_decay_steps=max(total_steps, 1), lr_decay_style=style,
        start_wd=weight_decay, end_wd=weight_decay, wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )


def _loss_func(batch: Batch, model, hidden: torch.Tensor):
    """Token NLL sum and entropy sum of one micro-batch, from the final hidden states and the
    vocabulary-parallel output weight (ops.logprob_entropy: no [tokens, vocabulary] logits)."""
    mask = flat(batch.loss_mask.float())
    logp, entropy = logprob_entropy(hidden, model.output_weight(), flat(batch.labels), temperature=1.0,
                                    loss_mask=mask, **head_args(model))
    loss_sum = -(logp * mask).sum()
    entropy_sum = (entropy.detach() * mask).sum()
    n_tokens = mask.sum().to(torch.int)
    return loss_sum, n_tokens, {"lm_loss": torch.stack([loss_sum.detach(), mask.sum(), entropy_sum])}


def _forward_step(data_iterator, model):
    batch = to_device(next(data_iterator))
    hidden = hidden_tokens(model, batch.input_ids, batch.positions(), batch.doc_ids)
    return hidden, partial(_loss_func, batch, unwrap(model))


def forward_backward(ddp, micro_batches: list[Batch], forward_only: bool = False) -> dict:
    """Run the schedule over this rank's micro-batches; returns the mean loss and the mean
    predictive entropy over the data-parallel group's loss tokens, and that token count."""
    b, s = micro_batches[0].input_ids.shape
    reduced = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iter(micro_batches),
        model=[ddp],
        num_microbatches=len(micro_batches),
        seq_length=s,
        micro_batch_size=b,
        forward_only=forward_only,
    )
    totals = torch.stack([r["lm_loss"] for r in reduced]).sum(0)
    dist.all_reduce(totals, group=ps.get_data_parallel_group())
    count = totals[1].clamp(min=1)
    return {"loss": (totals[0] / count).item(), "entropy": (totals[2] / count).item(),
            "tokens": int(totals[1].item())}
