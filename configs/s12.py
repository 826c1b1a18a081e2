"""RIFormer-S12, `configs/riformer.py:s12` (`:ft384` here is `:s12_ft384` there)."""

from configs import riformer


def get_config(arg=None):
  return riformer.get_config(f"s12_{arg}" if arg else "s12")
