"""Training shared by both stages: the session (`session.py`), Megatron's DDP/optimizer/schedule
(`engine.py`), checkpoints, the run log; `sft.py` is the distillation stage."""
