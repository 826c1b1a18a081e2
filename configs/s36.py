"""RIFormer-S36, the paper's final recipe (Table 10)."""

from configs import common


def get_config():
  return common.riformer_config("s36")
