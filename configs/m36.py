"""RIFormer-M36, `configs/riformer.py:m36` (`:ft384` here is `:m36_ft384` there)."""

from configs import riformer


def get_config(arg=None):
  return riformer.get_config(f"m36_{arg}" if arg else "m36")
