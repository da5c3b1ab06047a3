"""`megatron-ring run`: a pipeline recipe's stages (distill -> select -> RL stages) in order,
each in its own processes, and the report of the whole run."""
