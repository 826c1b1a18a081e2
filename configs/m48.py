"""RIFormer-M48, `configs/riformer.py:m48` (`:ft384` here is `:m48_ft384` there)."""

from configs import riformer


def get_config(arg=None):
  return riformer.get_config(f"m48_{arg}" if arg else "m48")
