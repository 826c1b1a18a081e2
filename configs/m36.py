"""RIFormer-M36: the paper's final recipe (Table 10), or with
`configs/m36.py:ft384` the 384 fine-tuning recipe."""

from configs import common


def get_config(arg=None):
  if arg == "ft384":
    return common.finetune_384_config("m36")
  if arg:
    raise ValueError(f"configs/m36.py: unknown argument {arg!r}; expected ft384")
  return common.riformer_config("m36")
