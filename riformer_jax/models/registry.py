"""Model registry: `create_model("riformer_s12", deploy=True)` and friends.

Students and their MetaFormer relatives (riformer_, identityformer_, poolformer_ with
s12 ... m48; Table 8's slimmed poolformer_s9 and poolformer_xs12), the Table 9 student riformerv2_ (RIFormer in the MetaFormer-baselines
design: s12, s18, s24, s36, m36, m48) and the teachers: the MetaFormer baselines
poolformerv2_ and randformer_ (s12 ... m48), convformer_ and caformer_ (s18, s36,
m36, b36), and GFNet (gfnet_ti/xs/s/b, gfnet_h_ti/h_s/h_b).
"""

import dataclasses

from riformer_jax.models import baselines, gfnet, metaformer

# Sizes shared by PoolFormer v1 and RIFormer (docs/reference.md section 1).
_SIZES = {
    "s12": dict(depths=(2, 2, 6, 2), dims=(64, 128, 320, 512), layer_scale_init_value=1e-5),
    "s24": dict(depths=(4, 4, 12, 4), dims=(64, 128, 320, 512), layer_scale_init_value=1e-5),
    "s36": dict(depths=(6, 6, 18, 6), dims=(64, 128, 320, 512), layer_scale_init_value=1e-6),
    "m36": dict(depths=(6, 6, 18, 6), dims=(96, 192, 384, 768), layer_scale_init_value=1e-6),
    "m48": dict(depths=(8, 8, 24, 8), dims=(96, 192, 384, 768), layer_scale_init_value=1e-6),
}
# Table 8's slimmed PoolFormers, which the paper describes only as "depth 9" and
# "about 5/6 of the width" (docs/models.md, "Table 8"). S9 takes its three blocks from
# the third stage, which holds half of S12's blocks: every other stage keeps S12's two,
# so each resolution keeps a block pair. XS12 takes each S12 width times 5/6 to the
# nearest multiple of 8 (the granularity of GPU tensor cores and TPU lanes).
_SLIM_POOLFORMERS = {
    "poolformer_s9": dict(_SIZES["s12"], depths=(2, 2, 3, 2)),
    "poolformer_xs12": dict(_SIZES["s12"], dims=(56, 104, 264, 424)),
}
_FAMILIES = {
    "riformer": dict(token_mixer="affine"),
    "identityformer": dict(token_mixer="identity"),
    "poolformer": dict(token_mixer="pooling"),
}

# The MetaFormer baselines (docs/reference.md section 2): name -> depths, dims.
_V2_SIZES = {
    "s12": ((2, 2, 6, 2), (64, 128, 320, 512)),
    "s24": ((4, 4, 12, 4), (64, 128, 320, 512)),
    "s36": ((6, 6, 18, 6), (64, 128, 320, 512)),
    "m36": ((6, 6, 18, 6), (96, 192, 384, 768)),
    "m48": ((8, 8, 24, 8), (96, 192, 384, 768)),
}
_BASELINE_SIZES = {
    "poolformerv2": _V2_SIZES,
    "randformer": _V2_SIZES,
    # The paper's 18-layer student has ConvFormer-S18's / CAFormer-S18's stages.
    "riformerv2": {**_V2_SIZES, "s18": ((3, 3, 9, 3), (64, 128, 320, 512))},
    **{family: {
        "s18": ((3, 3, 9, 3), (64, 128, 320, 512)),
        "s36": ((3, 12, 18, 3), (64, 128, 320, 512)),
        "m36": ((3, 12, 18, 3), (96, 192, 384, 576)),
        "b36": ((3, 12, 18, 3), (128, 256, 512, 768)),
    } for family in ("convformer", "caformer")},
}
_BASELINE_FAMILIES = {
    "poolformerv2": dict(token_mixers=("pooling",) * 4, norm="groupnorm"),
    # Identity in stages 1-2, a frozen random token-mixing matrix in stages 3-4.
    "randformer": dict(token_mixers=("identity",) * 2 + ("random",) * 2, norm="groupnorm"),
    "convformer": dict(token_mixers=("sepconv",) * 4, norm="layernorm", mlp_head=True),
    "caformer": dict(token_mixers=("sepconv",) * 2 + ("attention",) * 2,
                     norm="layernorm", mlp_head=True),
    # Table 9's student: the baselines' block (GroupNorm(1) as PoolFormerV2 and
    # RandFormer, linear head) with RIFormer's affine mixer. Distilled from ConvFormer
    # or CAFormer, `norm="layernorm", mlp_head=True` makes every tensor but the
    # mixer's match the teacher's (configs/roadmap.py, Table 9).
    "riformerv2": dict(token_mixers=("affine",) * 4, norm="groupnorm"),
}

# name -> (module class, its keyword arguments).
_REGISTRY = {
    **{f"{family}_{size}": (metaformer.MetaFormer, {**family_kwargs, **size_kwargs})
       for family, family_kwargs in _FAMILIES.items()
       for size, size_kwargs in _SIZES.items()},
    **{name: (metaformer.MetaFormer, dict(token_mixer="pooling", **kwargs))
       for name, kwargs in _SLIM_POOLFORMERS.items()},
    **{f"{family}_{size}": (baselines.MetaFormerBaseline,
                            dict(_BASELINE_FAMILIES[family], depths=depths, dims=dims))
       for family, sizes in _BASELINE_SIZES.items()
       for size, (depths, dims) in sizes.items()},
    **{name: (gfnet.CLASSES[name], kwargs) for name, kwargs in gfnet.SIZES.items()},
}


def _fields(module_class):
  return tuple(f.name for f in dataclasses.fields(module_class)
               if f.name not in ("parent", "name"))


def has_deploy_form(module_or_kwargs):
  """Whether a model (a module, or `model_kwargs`) is a training-time RIFormer, v1 or
  v2, i.e. one that `surgery.reparameterize` folds into a `deploy=True` twin."""
  get = (module_or_kwargs.get if isinstance(module_or_kwargs, dict)
         else lambda field: getattr(module_or_kwargs, field, None))
  affine = (get("token_mixer") == "affine"
            or set(get("token_mixers") or ()) == {"affine"})
  return affine and not get("deploy")


def list_models():
  """Names accepted by `create_model`."""
  return sorted(_REGISTRY)


def registry_class(name):
  """The Linen module class `create_model(name)` builds."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
  return _REGISTRY[name][0]


def model_kwargs(name, **overrides):
  """The full keyword arguments `create_model(name, **overrides)` builds with."""
  module_class, kwargs = registry_class(name), _REGISTRY[name][1]
  accepted = _fields(module_class)
  unknown = sorted(set(overrides) - set(accepted))
  if unknown:
    raise TypeError(f"create_model({name!r}): unknown argument(s) {unknown}; "
                    f"accepted: {list(accepted)}")
  return {**kwargs, **overrides}


def create_model(name, **overrides):
  """Returns the Linen module registered as `name`, with `overrides` applied.

  Any attribute of the model's class (`MetaFormer` for RIFormer, IdentityFormer and
  PoolFormer; `MetaFormerBaseline` for PoolFormerV2, ConvFormer and CAFormer; `GFNet`
  and `GFNetPyramid`) can be overridden, e.g.::

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
  kwargs = model_kwargs(name, **overrides)
  module_class, _ = _REGISTRY[name]
  return module_class(**kwargs)
