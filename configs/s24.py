"""RIFormer-S24, `configs/riformer.py:s24` (`:ft384` here is `:s24_ft384` there)."""

from configs import riformer


def get_config(arg=None):
  return riformer.get_config(f"s24_{arg}" if arg else "s24")
