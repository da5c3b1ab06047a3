"""The RL stage: `loop.py` reads as the algorithm over `rollouts.py` (prompts -> engine -> rewards
-> GRPO advantages -> token budget -> micro-batches) and `actor.py` (old/ref passes, the update);
`loss_modes.py` is the table of c3po, grpo and token_mean."""
