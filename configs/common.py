"""What every RIFormer config shares: the paper's final recipe (Table 10).

Override any field from the command line, e.g.
`python train.py --config=configs/riformer.py:s12 --config.batch_size=256 --config.epochs=120`;
a misspelt field is rejected with its name.
"""

import ml_collections

from riformer_jax.models import registry

# Table 10, "lambda x batch_size" for (L_in', L_out, L_rel), kept as printed: the
# module-imitation weights in config.losses are these values, and
# config.distill.mi_reading says how they become weights on our mean-reduced losses
# (riformer_jax/train/losses.py MI_READINGS; docs/roadmap.md measures the readings).
_MI_LAMBDAS = {
    "s12": (1e-4, 1e-3, 1.0),
    "s24": (3e-4, 5e-3, 4.0),
    "s36": (1e-4, 1e-3, 1.0),
    "m36": (1e-4, 1e-3, 1.0),
    "m48": (1e-4, 1e-3, 1.0),
}
SIZES = tuple(_MI_LAMBDAS)


def term(weight, start_epoch=0, end_epoch=-1):
  """A loss term: `weight` from `start_epoch` (inclusive) to `end_epoch` (exclusive;
  -1 = to the end). Epochs may be fractional: windows are checked every step."""
  return ml_collections.ConfigDict(dict(weight=float(weight),
                                        start_epoch=float(start_epoch),
                                        end_epoch=float(end_epoch)))


def last_block_of_each_stage(depths):
  """Default module-imitation blocks: each stage's output (the paper found 4 blocks best
  for S12 without saying which; the stage outputs spread them over all resolutions)."""
  return tuple(f"stages_{i}/blocks_{d - 1}" for i, d in enumerate(depths))


def riformer_config(size):
  """RIFormer-`size` with the paper's final recipe: GFNet-H-B logit teacher, a
  PoolFormer of the same size as feature teacher and initialisation, soft KD without
  labels, module imitation for 400 (features) and 100 (relations) of 600 epochs."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model_name = f"riformer_{size}"
  config.model = ml_collections.ConfigDict(dict(
      num_classes=1000,
      drop_path_rate=0.1,  # Table 10: peak stochastic-depth rate, every size
      drop_rate=0.0,
  ))
  config.compute_dtype = "bfloat16"  # params stay float32
  config.remat = False  # recompute each block in the backward pass: less memory
  config.init_from = ""  # a student directory (load_pretrained) to start from
  config.resolution = 224

  config.data = ml_collections.ConfigDict(dict(
      dataset="imagenet2012",  # or "synthetic", "folder", "tfds:<name>"
      data_dir="",
      seed=0,  # the embedded set's generation seed (config.seed varies the run only)
      train_split="train",
      eval_split="validation",
      crop_pct=0.9 if size.startswith("s") else 0.95,  # 0 = no resize before the crop
      num_threads=0,  # tf.data threads per host; 0 = AUTOTUNE
      # uint8 batches leave the host; normalisation and erasing run in the jitted step
      # (a quarter of the bytes, ~2 ms less host work per image: docs/data.md).
      uint8_batches=True,
      # Training images that cannot be read (damaged or replaced after the start, a
      # network filesystem) are skipped, named and counted (data/unreadable); past this
      # fraction of the split the run stops.
      max_bad_fraction=0.001,
  ))
  config.aug = ml_collections.ConfigDict(dict(
      auto_augment="rand-m9-mstd0.5-inc1",  # or "original" (AutoAugment) or ""
      # "device": in the jitted train step on the uint8 batch (data.uint8_batches), the
      # host only decodes, crops, resizes and flips; "host": in tf.data, for hosts
      # with cores to spare where the accelerator is the bottleneck (docs/data.md).
      auto_augment_on="device",
      # "device": the host sends each decoded crop in a canvas x canvas uint8 frame and
      # the step resizes it (PIL's bicubic, antialiased); "host": tf.data resizes. 512
      # holds a whole ImageNet image (longer side <= 500); larger crops are resized
      # on the host. 5.2x the bytes of a 224 image per transfer (docs/data.md).
      resize_on="device",
      canvas=512,
      re_prob=0.25,
      hflip=0.5,
      exact_resize=False,  # True: PIL's two resize passes (2x the crop's resize time)
      reduced_dct=False,  # True: JPEG crops >= 2x the resolution decode at 1/2-1/8 scale
      scale=(0.08, 1.0),  # random-resized crop: area and aspect-ratio ranges
      ratio=(3 / 4, 4 / 3),
      mixup=0.8,
      cutmix=1.0,
      switch_prob=0.5,
      label_smoothing=0.1,
  ))

  config.batch_size = 512 if size == "m48" else 1024  # global, over all hosts
  config.accum_steps = 1  # micro-batches per update: same update, less memory
  config.epochs = 600
  config.total_steps = 0  # > 0 overrides epochs (smoke tests)
  config.warmup_epochs = 5
  config.lr = 1e-3  # per 1024 images: peak lr = lr * batch_size / 1024
  config.min_lr = 1e-5
  config.weight_decay = 0.05
  config.clip_grad_norm = 0.0  # 0 = off (paper); MMPreTrain's configs use 5.0
  config.ema_decay = 0.0  # 0 = off (paper)
  config.fsdp = False  # shard params/optimizer state/teachers over devices (FSDP)

  config.teachers = ml_collections.ConfigDict(dict(
      logit="",  # directory from convert.py, e.g. a converted GFNet-H-B
      feature="",  # a converted PoolFormer of the student's size (module imitation)
      init_from_feature=True,  # Guideline 5: student <- feature teacher, all but mixer
      compute_dtype="bfloat16",
  ))
  config.distill = ml_collections.ConfigDict(dict(
      temperature=1.0,
      mi_blocks=last_block_of_each_stage(registry.model_kwargs(config.model_name)["depths"]),
      # How losses.mi_* (Table 10's values) weigh our mean-reduced terms: "value" (the
      # value is the weight), "times_batch" (value x mi_batch) or "per_batch" (value /
      # mi_batch). "value" is the reading that worked in docs/roadmap.md's study (3
      # seeds): "times_batch" lets L_rel swamp L_soft and ends below cross-entropy;
      # "per_batch" leaves module imitation too weak to matter.
      mi_reading="value",
      # The batch of the paper's run that the values refer to (512 for m48); a later
      # --config.batch_size does not change it.
      mi_batch=config.batch_size,
  ))
  l1, l2, l3 = _MI_LAMBDAS[size]
  config.losses = ml_collections.ConfigDict(dict(
      ce=term(0.0),  # Guideline 1: soft KD without the labels
      hard_kd=term(0.0),
      soft_kd=term(1.0),
      mi_in=term(l1, end_epoch=400),
      mi_out=term(l2, end_epoch=400),
      mi_rel=term(l3, end_epoch=100),
  ))

  config.log_every_steps = 50
  config.eval_every_epochs = 10
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  config.profile_steps = (0, 0)  # (first step, count): a jax.profiler trace; 0 = off
  # XLA programs kept across runs: a restarted run does not compile again ("" = off).
  config.compilation_cache_dir = "~/.cache/riformer_jax/jax"
  return config


def finetune_384_config(size):
  """The 384 fine-tuning recipe: 30 epochs from a 224 RIFormer, ConvFormer logit
  teacher, no module imitation (paper appendix)."""
  config = riformer_config(size)
  config.resolution = 384
  config.epochs = 30
  config.warmup_epochs = 0
  config.lr = 5e-5  # MMPreTrain-style fine-tuning lr per 1024; paper does not state it
  config.init_from = ""  # set to the 224 student's directory
  config.teachers.feature = ""
  config.teachers.init_from_feature = False
  for name in ("mi_in", "mi_out", "mi_rel"):
    config.losses[name].weight = 0.0
  return config
