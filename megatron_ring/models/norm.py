"""RMSNorm for the local (non-Transformer-Engine) spec, usable under sequence parallelism.

Megatron's WrappedTorchNorm refuses sequence_parallel. Under sequence parallelism each TP rank
normalises a slice of the sequence, so the weight's gradient is partial per rank; marking the
weight `sequence_parallel` makes Megatron's DDP all-reduce it over the TP group.
"""

import torch

from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.Module):
    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **_):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As in Ling's HF code: normalise in fp32, cast back, then scale.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)
