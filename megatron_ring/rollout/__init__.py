"""Rollout engines: where RL responses come from (an SGLang server, or the Megatron model itself)."""
