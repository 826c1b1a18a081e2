"""RIFormer at every size: the paper's final recipe (Table 10), or the 384 fine-tuning.

  python train.py --config=configs/riformer.py:s12 --workdir=runs/s12
  python train.py --config=configs/riformer.py:m48_ft384 --workdir=runs/m48_384 \\
      --config.init_from=runs/m48/student

The argument is a size (s12, s24, s36, m36, m48), with `_ft384` for the fine-tuning
recipe. configs/s12.py ... m48.py are the same configs under their older names.
"""

from configs import common


def get_config(arg="s12"):
  size, _, variant = (arg or "s12").partition("_")
  if size not in common.SIZES or variant not in ("", "ft384"):
    raise ValueError(f"configs/riformer.py: unknown argument {arg!r}; expected one of "
                     f"{list(common.SIZES)}, optionally with _ft384 (e.g. s12_ft384)")
  return common.finetune_384_config(size) if variant else common.riformer_config(size)
