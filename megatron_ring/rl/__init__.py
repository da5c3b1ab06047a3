"""The RL stage: rollouts -> rewards -> GRPO advantages -> C3PO token budget -> update."""
