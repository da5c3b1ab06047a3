"""Choosing the distillation checkpoint that starts RL by its entropy (paper 4.3.1-4.3.2)."""
