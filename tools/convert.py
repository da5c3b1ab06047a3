#!/usr/bin/env python
"""Thin wrapper: `python tools/convert.py hf-to-megatron SRC DST --tp 2 --ep 2` == `megatron-ring convert ...`."""
import sys

from megatron_ring.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
