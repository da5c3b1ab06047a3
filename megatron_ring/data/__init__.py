"""Training data: the embedded demo data set (tasks, tokenizer) and the stage-specific readers."""
