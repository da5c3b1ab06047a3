"""Silencing warnings that carry no news for a user (imported before torch and Megatron)."""

from __future__ import annotations

import warnings

# Warnings that say only that the CPU build lacks GPU libraries, or that Megatron-Core 0.16.1
# calls torch APIs torch has since renamed: one line each per process is noise, not news.
KNOWN_WARNINGS = (
    r".*(Apex|Transformer Engine and Apex) (is|are) not installed.*",
    r"full scope is deprecated.*",
    r"`torch\.distributed\.\w+` is deprecated.*",
    r"`load_state_dict` is deprecated.*",
    r"Please use DTensor instead.*",
    # The distributed optimizer's zero_grad reads .grad of its shard views (0.16.1).
    r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed.*",
)


def quiet_known_warnings() -> None:
    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
