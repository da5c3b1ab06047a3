"""Programs the tests run under torchrun (one process per rank)."""

import argparse

from megatron_ring.models.hf_checkpoint import HFReader
from megatron_ring.platform import distributed


def start_model_worker(doc: str, **int_options):
    """The arguments of a worker over one HF checkpoint at a TP/EP layout (--hf, --tp, --ep,
    --out, and --NAME for each int option, its value the default), parsed; the process group
    joined. Returns (args, validated layout, HF reader)."""
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--hf", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--out", required=True)
    for name, default in int_options.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=default)
    a = p.parse_args()
    layout = distributed.init(a.tp, a.ep)
    reader = HFReader(a.hf)
    return a, layout.validate(reader.arch), reader
