"""Parameter and MAC counts of registered models, as a table.

    python -m riformer_jax.models.summary                       # every registered model
    python -m riformer_jax.models.summary riformer_s12 --resolution 384
"""

import argparse

from riformer_jax.models import counting, registry

MIN_RESOLUTION = 32  # a stride-4 stem and three stride-2 downsamplings: one last token


def summary_rows(names, resolution=224, num_classes=1000):
  """(name, form, params, MACs) for each model; RIFormers in both forms."""
  rows = []
  for name in names:
    forms = ([("train", {}), ("deploy", {"deploy": True})]
             if registry.has_deploy_form(registry.model_kwargs(name)) else [("", {})])
    for form, deploy in forms:
      overrides = {"num_classes": num_classes, **deploy}
      model = registry.create_model(name, **overrides)
      if "random" in getattr(model, "token_mixers", ()):  # its matrices fix the size
        model = model.clone(img_size=resolution)
      params = counting.count_params(counting.abstract_variables(model, resolution))
      rows.append((name, form, params, counting.count_macs(model, resolution)))
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("names", nargs="*", help="registered models (default: all)")
  parser.add_argument("--resolution", type=int, default=224)
  parser.add_argument("--num-classes", type=int, default=1000)
  args = parser.parse_args(argv)
  if args.resolution < MIN_RESOLUTION:
    parser.error(f"--resolution {args.resolution}: the models downsample by 32; "
                 f"expected at least {MIN_RESOLUTION}")
  names = args.names or registry.list_models()
  for name in names:
    if name not in registry.list_models():
      parser.error(f"unknown model {name!r}; available: {', '.join(registry.list_models())}")

  print(f"{'model':<20} {'form':<7} {'params':>12} {'GMACs@' + str(args.resolution):>11}")
  for name, form, params, macs in summary_rows(names, args.resolution, args.num_classes):
    print(f"{name:<20} {form:<7} {params:>12,} {macs / 1e9:>11.3f}")


if __name__ == "__main__":
  main()
