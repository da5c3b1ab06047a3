"""In-process generation with the Megatron model (the embedded rollout engine's core)."""
