"""RIFormer-S36, `configs/riformer.py:s36` (`:ft384` here is `:s36_ft384` there)."""

from configs import riformer


def get_config(arg=None):
  return riformer.get_config(f"s36_{arg}" if arg else "s36")
