"""Model registry: `create_model("riformer_s12", deploy=True)` and friends."""

import dataclasses

from riformer_jax import metaformer

# Sizes shared by PoolFormer v1 and RIFormer (REFERENCE.md section 1).
_SIZES = {
    "s12": dict(depths=(2, 2, 6, 2), dims=(64, 128, 320, 512), layer_scale_init_value=1e-5),
    "s24": dict(depths=(4, 4, 12, 4), dims=(64, 128, 320, 512), layer_scale_init_value=1e-5),
    "s36": dict(depths=(6, 6, 18, 6), dims=(64, 128, 320, 512), layer_scale_init_value=1e-6),
    "m36": dict(depths=(6, 6, 18, 6), dims=(96, 192, 384, 768), layer_scale_init_value=1e-6),
    "m48": dict(depths=(8, 8, 24, 8), dims=(96, 192, 384, 768), layer_scale_init_value=1e-6),
}
_FAMILIES = {
    "riformer": dict(token_mixer="affine"),
    "identityformer": dict(token_mixer="identity"),
    "poolformer": dict(token_mixer="pooling"),
}
_REGISTRY = {
    f"{family}_{size}": {**family_kwargs, **size_kwargs}
    for family, family_kwargs in _FAMILIES.items()
    for size, size_kwargs in _SIZES.items()
}
_OVERRIDABLE = tuple(
    f.name for f in dataclasses.fields(metaformer.MetaFormer)
    if f.name not in ("parent", "name"))


def list_models():
  """Names accepted by `create_model`."""
  return sorted(_REGISTRY)


def model_kwargs(name, **overrides):
  """The full keyword arguments `create_model(name, **overrides)` builds with."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
  unknown = sorted(set(overrides) - set(_OVERRIDABLE))
  if unknown:
    raise TypeError(f"create_model({name!r}): unknown argument(s) {unknown}; "
                    f"accepted: {list(_OVERRIDABLE)}")
  return {**_REGISTRY[name], **overrides}


def create_model(name, **overrides):
  """Returns the Linen module registered as `name`, with `overrides` applied.

  Any `MetaFormer` attribute can be overridden, e.g.::

    model = riformer_jax.create_model("riformer_s12", num_classes=10,
                                      drop_path_rate=0.1, dtype=jnp.bfloat16)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    logits = model.apply(variables, images_nhwc, train=False)
    logits = model.apply(variables, images_nhwc, train=True,
                         rngs={"dropout": jax.random.key(1)})

    deploy = riformer_jax.create_model("riformer_s12", deploy=True)  # fused form
    timm_pf = riformer_jax.create_model("poolformer_s12", head="timm")

  Tiny variants for tests: `create_model("riformer_s12", depths=(1, 1, 2, 1),
  dims=(8, 16, 24, 32))`.
  """
  return metaformer.MetaFormer(**model_kwargs(name, **overrides))
