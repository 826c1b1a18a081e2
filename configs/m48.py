"""RIFormer-M48, the paper's final recipe (Table 10)."""

from configs import common


def get_config():
  return common.riformer_config("m48")
