"""timm's RandAugment and AutoAugment specifications: operation lists, policies and the
`--aa` string parser, shared by the host path (`augment`, TensorFlow) and the device
path (`device_augment`, JAX). No TensorFlow here: the train step imports this."""

import math
import re
from typing import NamedTuple, Tuple

from riformer_jax.data import imagenet

# timm fills the uncovered area of geometric operations with the mean colour.
FILL = tuple(min(255, round(255 * m)) for m in imagenet.MEAN)  # (124, 116, 104)

LEVEL_DENOM = 10.0  # timm's magnitude scale: M10 is the strongest level


# timm's RandAugment operation lists (`_RAND_TRANSFORMS`, `_RAND_INCREASING_TRANSFORMS`).
RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
            "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX",
            "ShearY", "TranslateXRel", "TranslateYRel")
RAND_INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate",
                       "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
                       "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                       "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
                       "TranslateYRel")

# The ImageNet AutoAugment policy of the paper (arXiv:1805.09501), timm's "original":
# 25 sub-policies of two (operation, probability, magnitude) steps.
_POLICY_ORIGINAL = (
    (("PosterizeOriginal", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)),
    (("Equalize", 0.8, 8), ("Equalize", 0.6, 3)),
    (("PosterizeOriginal", 0.6, 7), ("PosterizeOriginal", 0.6, 6)),
    (("Equalize", 0.4, 7), ("Solarize", 0.2, 4)),
    (("Equalize", 0.4, 4), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, 7)),
    (("PosterizeOriginal", 0.8, 5), ("Equalize", 1.0, 2)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, 8), ("PosterizeOriginal", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, 2)),
    (("Equalize", 0.0, 7), ("Equalize", 0.8, 8)),
    (("Invert", 0.6, 4), ("Equalize", 1.0, 8)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, 8)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, 9)),
    (("Color", 0.4, 0), ("Equalize", 0.6, 3)),
    (("Equalize", 0.4, 7), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)),
    (("Invert", 0.6, 4), ("Equalize", 1.0, 8)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, 8), ("Equalize", 0.6, 3)),
)

# The TPU EfficientNet ImageNet policy, timm's "v0".
_POLICY_V0 = (
    (("Equalize", 0.8, 1), ("ShearY", 0.8, 4)),
    (("Color", 0.4, 9), ("Equalize", 0.6, 3)),
    (("Color", 0.4, 1), ("Rotate", 0.6, 8)),
    (("Solarize", 0.8, 3), ("Equalize", 0.4, 7)),
    (("Solarize", 0.4, 2), ("Solarize", 0.6, 2)),
    (("Color", 0.2, 0), ("Equalize", 0.8, 8)),
    (("Equalize", 0.4, 8), ("SolarizeAdd", 0.8, 3)),
    (("ShearX", 0.2, 9), ("Rotate", 0.6, 8)),
    (("Color", 0.6, 1), ("Equalize", 1.0, 2)),
    (("Invert", 0.4, 9), ("Rotate", 0.6, 0)),
    (("Equalize", 1.0, 9), ("ShearY", 0.6, 3)),
    (("Color", 0.4, 7), ("Equalize", 0.6, 0)),
    (("Posterize", 0.4, 6), ("AutoContrast", 0.4, 7)),
    (("Solarize", 0.6, 8), ("Color", 0.6, 9)),
    (("Solarize", 0.2, 4), ("Rotate", 0.8, 9)),
    (("Rotate", 1.0, 7), ("TranslateYRel", 0.8, 9)),
    (("ShearX", 0.0, 0), ("Solarize", 0.8, 4)),
    (("ShearY", 0.8, 0), ("Color", 0.6, 4)),
    (("Color", 1.0, 0), ("Rotate", 0.6, 2)),
    (("Equalize", 0.8, 4), ("Equalize", 0.0, 8)),
    (("Equalize", 1.0, 4), ("AutoContrast", 0.6, 2)),
    (("ShearY", 0.4, 7), ("SolarizeAdd", 0.6, 7)),
    (("Posterize", 0.8, 2), ("Solarize", 0.6, 10)),
    (("Solarize", 0.6, 8), ("Equalize", 0.6, 1)),
    (("Color", 0.8, 6), ("Rotate", 0.4, 5)),
)


def _research_posterize(policy):
  """timm's "r" variants: Posterize* replaced by PosterizeIncreasing."""
  return tuple(tuple(("PosterizeIncreasing" if n.startswith("Posterize") else n, p, m)
                     for n, p, m in sub) for sub in policy)


AUTO_AUGMENT_POLICIES = {
    "original": _POLICY_ORIGINAL,
    "originalr": _research_posterize(_POLICY_ORIGINAL),
    "v0": _POLICY_V0,
    "v0r": _research_posterize(_POLICY_V0),
}



# ---------------------------------------------------------------- magnitudes


def level_functions(minimum, maximum, floor_to_int):
  """timm's level functions, `(magnitude, sign) -> the operation's argument`, for a
  magnitude after noise and clipping and a random sign of +1 or -1 (timm's
  `_randomly_negate`). Written once for both paths: the caller passes its backend's
  elementwise `minimum`, `maximum` and `floor_to_int` (TensorFlow on the host, JAX in
  the step)."""
  d = LEVEL_DENOM

  def signed(scale):
    return lambda m, s: s * (m / d * scale)

  def enhance(m, _):
    return m / d * 1.8 + 0.1

  def enhance_increasing(m, s):
    return maximum(0.1, 1.0 + s * (m / d * 0.9))

  def solarize(m, _):
    return minimum(256, floor_to_int(m / d * 256))

  def no_argument(m, s):
    return 0.0

  return {
      "AutoContrast": no_argument, "Equalize": no_argument, "Invert": no_argument,
      "Rotate": signed(30.0),
      "Posterize": lambda m, s: floor_to_int(m / d * 4),
      "PosterizeIncreasing": lambda m, s: 4 - floor_to_int(m / d * 4),
      "PosterizeOriginal": lambda m, s: floor_to_int(m / d * 4) + 4,
      "Solarize": solarize,
      "SolarizeIncreasing": lambda m, s: 256 - solarize(m, s),
      "SolarizeAdd": lambda m, s: minimum(128, floor_to_int(m / d * 110)),
      "Color": enhance, "ColorIncreasing": enhance_increasing,
      "Contrast": enhance, "ContrastIncreasing": enhance_increasing,
      "Brightness": enhance, "BrightnessIncreasing": enhance_increasing,
      "Sharpness": enhance, "SharpnessIncreasing": enhance_increasing,
      "ShearX": signed(0.3), "ShearY": signed(0.3),
      "TranslateXRel": signed(0.45), "TranslateYRel": signed(0.45),
  }


# ---------------------------------------------------------------- parsing


class AugmentConfig(NamedTuple):
  """A parsed timm auto-augment string ("rand-m9-mstd0.5-inc1", "original", ...)."""

  kind: str  # "rand" or "auto"
  ops: Tuple[str, ...] = ()  # RandAugment's operations
  policy: Tuple = ()  # AutoAugment's sub-policies
  magnitude: float = 10.0
  num_layers: int = 2
  prob: float = 0.5
  magnitude_std: float = 0.0
  magnitude_max: float = LEVEL_DENOM


def parse_auto_augment(spec: str) -> AugmentConfig:
  """Parses timm's `--aa` strings; raises ValueError naming the bad section."""
  sections = spec.split("-")
  fields = {}
  if sections[0] == "rand":
    fields.update(kind="rand", ops=RAND_OPS)
    for section in sections[1:]:
      key, value = _split_section(spec, section)
      if key == "m":
        fields["magnitude"] = float(int(value))
      elif key == "n":
        fields["num_layers"] = int(value)
      elif key == "p":
        fields["prob"] = float(value)
      elif key == "mstd":
        # timm: a standard deviation above 100 means uniform sampling in [0, m].
        fields["magnitude_std"] = math.inf if float(value) > 100 else float(value)
      elif key == "mmax":
        fields["magnitude_max"] = float(int(value))
      elif key == "inc":
        if int(value):
          fields["ops"] = RAND_INCREASING_OPS
      else:
        raise ValueError(f"auto_augment={spec!r}: unknown RandAugment section {section!r}")
    return AugmentConfig(**fields)
  if sections[0] in AUTO_AUGMENT_POLICIES:
    fields.update(kind="auto", policy=AUTO_AUGMENT_POLICIES[sections[0]])
    for section in sections[1:]:
      key, value = _split_section(spec, section)
      if key != "mstd":
        raise ValueError(f"auto_augment={spec!r}: unknown AutoAugment section {section!r}")
      fields["magnitude_std"] = float(value)
    return AugmentConfig(**fields)
  raise ValueError(
      f"auto_augment={spec!r}: expected 'rand-...' (e.g. 'rand-m9-mstd0.5-inc1') or an "
      f"AutoAugment policy {sorted(AUTO_AUGMENT_POLICIES)} (e.g. 'original-mstd0.5')")


def _split_section(spec, section):
  match = re.fullmatch(r"([a-z]+)(\d.*)", section)
  if not match:
    raise ValueError(f"auto_augment={spec!r}: cannot parse section {section!r}")
  return match.group(1), match.group(2)
