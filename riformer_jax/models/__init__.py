"""The Flax models (MetaFormer students and teachers, the MetaFormer baselines, GFNet),
their registry, counting and the pure parameter surgery."""

from riformer_jax.models.registry import (
    create_model,
    has_deploy_form,
    list_models,
    model_kwargs,
    registry_class,
)

__all__ = ["create_model", "has_deploy_form", "list_models", "model_kwargs", "registry_class"]
