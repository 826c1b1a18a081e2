"""RIFormer (CVPR 2023) and its MetaFormer relatives in JAX/Flax."""

from riformer_jax.models import create_model, list_models
from riformer_jax.models.counting import count_macs, count_params
from riformer_jax.models.metaformer import MetaFormer
from riformer_jax.models.surgery import (
    TransferReport,
    init_student_from_teacher,
    reparameterize,
)
from riformer_jax.weights.pretrained import load_pretrained

__all__ = [
    "MetaFormer",
    "TransferReport",
    "count_macs",
    "count_params",
    "create_model",
    "init_student_from_teacher",
    "list_models",
    "load_pretrained",
    "reparameterize",
]
