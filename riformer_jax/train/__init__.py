"""Training: the fused distillation step, sharding, losses, optimizer, mixing,
checkpointing, fault handling, reporting and the trainer that ties them together."""
