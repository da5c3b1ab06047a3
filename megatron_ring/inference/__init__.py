"""In-process generation with the Megatron model (the embedded rollout engine's core), the
sampling parameters every engine takes, and the held-out evaluation `select` and RL share."""
