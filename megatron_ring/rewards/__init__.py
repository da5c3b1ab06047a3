"""Verifiable rewards (paper 3.3): 1 when the answer is right, else 0; no format reward."""
