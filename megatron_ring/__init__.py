"""megatron-ring: Ring-lite's training recipe (distillation, entropy selection, C3PO RL) on Megatron-Core."""

__version__ = "0.1.0"
