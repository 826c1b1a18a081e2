"""`python convert.py --src ... --dst ...`: the conversion tool, riformer_jax/weights/convert.py
(installed as `riformer-convert`); `python convert.py --help` lists its options."""

import sys

from riformer_jax.weights.convert import main

if __name__ == "__main__":
  sys.exit(main())
