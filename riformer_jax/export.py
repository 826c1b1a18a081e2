"""Portable artifacts of a trained model: `jax.export` and TensorFlow SavedModel.

  python -m riformer_jax.export --src runs/s12/deploy --dst out/riformer_s12 [--fused]

writes `out/riformer_s12.jax` (a serialized `jax.export.Exported`, parameters
included, batch dimension symbolic) and `out/riformer_s12_savedmodel/` (a SavedModel
whose `serving_default` takes float32 NHWC images of any batch size). Neither needs
this project to run:

  exported = jax.export.deserialize(open("riformer_s12.jax", "rb").read())
  logits = exported.call(images)                       # any batch, fixed H, W

  model = tf.saved_model.load("riformer_s12_savedmodel")
  logits = model.serving_default(images=images)["logits"]
"""

import argparse
import os

import jax
import jax.numpy as jnp

from riformer_jax import pretrained


def inference_function(module, variables):
  """`images -> float32 logits` with the variables closed over (baked in on export)."""
  return lambda images: module.apply(variables, images, train=False)


def export_jax(module, variables, resolution, platforms=("cpu", "cuda")):
  """A `jax.export.Exported` for NHWC float32 images with a symbolic batch `b`."""
  (batch,) = jax.export.symbolic_shape("b")
  spec = jax.ShapeDtypeStruct((batch, resolution, resolution, 3), jnp.float32)
  return jax.export.export(jax.jit(inference_function(module, variables)),
                           platforms=platforms)(spec)


def save_saved_model(module, variables, resolution, directory):
  """A TensorFlow SavedModel (via jax2tf) with a `serving_default` signature."""
  import tensorflow as tf  # noqa: PLC0415 (optional: only for this artifact)
  from jax.experimental import jax2tf  # noqa: PLC0415

  converted = jax2tf.convert(inference_function(module, variables),
                             polymorphic_shapes=[f"(b, {resolution}, {resolution}, 3)"],
                             native_serialization_platforms=("cpu", "cuda"))
  wrapper = tf.Module()

  @tf.function(input_signature=[tf.TensorSpec([None, resolution, resolution, 3],
                                              tf.float32, name="images")],
               autograph=False)  # plain call, nothing to convert (and no warnings)
  def serving_default(images):
    return {"logits": converted(images)}

  wrapper.serving_default = serving_default
  tf.saved_model.save(wrapper, directory, signatures={"serving_default": serving_default})


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--src", required=True, help="a directory load_pretrained reads")
  parser.add_argument("--dst", required=True, help="output path prefix")
  parser.add_argument("--resolution", type=int, default=224)
  parser.add_argument("--fused", action="store_true",
                      help="use the fused deploy block (deploy-form RIFormers)")
  parser.add_argument("--no-saved-model", action="store_true")
  args = parser.parse_args(argv)
  overrides = {"fused": True} if args.fused else {}
  module, variables = pretrained.load_pretrained(args.src, **overrides)
  os.makedirs(os.path.dirname(os.path.abspath(args.dst)), exist_ok=True)
  exported = export_jax(module, variables, args.resolution)
  with open(args.dst + ".jax", "wb") as f:
    f.write(exported.serialize())
  print(f"wrote {args.dst}.jax ({pretrained.read_manifest(args.src)['model']}, "
        f"input (b, {args.resolution}, {args.resolution}, 3))")
  if not args.no_saved_model:
    save_saved_model(module, variables, args.resolution, args.dst + "_savedmodel")
    print(f"wrote {args.dst}_savedmodel/")


if __name__ == "__main__":
  main()
