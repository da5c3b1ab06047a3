"""SGLang's routed experts (rollout routing replay, R3) <-> Completion.routing.

What SGLang 0.5.23 returns, read in its wheel:
- Server flag `--enable-return-routed-experts` (ServerArgs field enable_return_routed_experts,
  srt/arg_groups/fields/exec_.py). Only with it does the model runner build the capturer
  (RoutedExpertsCapturer.create, srt/state_capturer/routed_experts.py); a request asking for
  routed experts on a server started without it gets no `meta_info.routed_experts` and no
  error (BatchResultProcessor._maybe_collect_routed_experts returns when there is no capturer).
- Request field `return_routed_experts: true` (GenerateReqInput, srt/managers/io_struct.py; one
  bool for a whole batch), and `routed_experts_start_len` (default 0, must be in [0, prompt
  tokens]; outside it the request is aborted with HTTP 400, Scheduler.handle_generate_request).
- `meta_info["routed_experts"]`: base64 (standard alphabet, padded) of the raw bytes of an int32
  tensor [rows, num_hidden_layers, num_experts_per_tok], C order, the host's byte order
  (little-endian on x86 and ARM servers): DetokenizerManager._b64_encode_per_request, and
  TokenizerManager when it gets tensors directly (skip_tokenizer_init).
- Coverage: rows are the positions [routed_experts_start_len, seqlen - 1) of prompt + output,
  seqlen = len(prompt) + len(output_ids) (BaseTopkCapturer.get_topk, state_capturer/base.py):
  every prompt token and every output token but the last, the one no forward has read. With
  start_len 0 that is exactly Completion.routing's positions. Rows of prefix-cached prompt tokens
  come from the forward that first wrote their KV slots.
- The layer axis is indexed by layer_id over all num_hidden_layers (a dense layer's row would
  stay 0; Ling has none: first_k_dense_replace 0). Ids are logical expert ids (captured before
  EPLB's logical-to-physical map, layers/moe/topk.py _post_process_topk_ids), the router's top-k
  in its own order (compare as sets); fused shared-expert columns are cut off ([:topk_size]).
- Not with beam search (refused), and only on finished requests (no streaming chunks).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

import numpy as np

from megatron_ring.models.router_replay import DTYPE, UNKNOWN
from megatron_ring.rollout.base import RolloutError

FIELD = "meta_info.routed_experts"
WIRE = np.dtype("<i4")  # SGLang's int32


@dataclass(frozen=True)
class RoutingSpec:
    """What a client asks the engines for: the model's MoE layers and experts per token
    (arch.num_layers, arch.moe_topk), which SGLang's answer does not state."""

    layers: int
    top_k: int


def rows_of(prompt_len: int, n_tokens: int) -> int:
    """Positions a forward reads: every prompt token and every response token but the last."""
    return max(0, prompt_len + n_tokens - 1)


def unknown(prompt_len: int, n_tokens: int, spec: RoutingSpec) -> np.ndarray:
    """Routing of a sample no engine ran (all UNKNOWN)."""
    return np.full((rows_of(prompt_len, n_tokens), spec.layers, spec.top_k), UNKNOWN, DTYPE)


def decode(value, prompt_len: int, n_tokens: int, layers: int, top_k: int, where: str,
           start: int = 0) -> np.ndarray:
    """meta_info.routed_experts (rows from `start`, SGLang's routed_experts_start_len) ->
    uint8 [prompt_len + n_tokens - 1, layers, top_k], UNKNOWN before start."""
    if not isinstance(value, str):
        raise RolloutError(f"{where}: field {FIELD} is {type(value).__name__}, expected a base64 string")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RolloutError(f"{where}: field {FIELD} is not base64 ({e})") from None
    total = rows_of(prompt_len, n_tokens)
    rows = max(0, total - start)
    want = rows * layers * top_k * WIRE.itemsize
    if len(raw) != want:
        raise RolloutError(f"{where}: field {FIELD} holds {len(raw)} bytes, expected {rows} positions x {layers} "
                           f"layers x top-{top_k} int32 = {want} (prompt {prompt_len} + {n_tokens} tokens - 1)")
    ids = np.frombuffer(raw, WIRE).reshape(rows, layers, top_k)
    if ids.size and not (0 <= ids.min() and ids.max() < UNKNOWN):
        bad = ids[(ids < 0) | (ids >= UNKNOWN)][0]
        raise RolloutError(f"{where}: field {FIELD} holds expert id {int(bad)}, expected 0 <= id < {UNKNOWN}")
    out = np.full((total, layers, top_k), UNKNOWN, DTYPE)
    out[total - rows:] = ids
    return out


def encode(ids) -> str:
    """[rows, layers, top_k] expert ids -> SGLang's meta_info.routed_experts."""
    return base64.b64encode(np.ascontiguousarray(ids, WIRE).tobytes()).decode("ascii")
