"""What every RIFormer config shares (paper Table 10)."""

import ml_collections


def riformer_config(size):
  """The model section of the paper's final RIFormer recipe for `size` ("s12", ...).

  `riformer_jax.create_model(config.model_name, **config.model)` builds the student.
  The training recipe (teachers, losses, schedule, augmentation) joins these fields
  when train.py lands.
  """
  config = ml_collections.ConfigDict()
  config.model_name = f"riformer_{size}"
  config.model = ml_collections.ConfigDict(dict(
      num_classes=1000,
      drop_path_rate=0.1,  # Table 10: peak stochastic-depth rate, every size
      drop_rate=0.0,
  ))
  config.resolution = 224
  return config
