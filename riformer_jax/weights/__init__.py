"""Weights in and out: PyTorch key layouts of every family, torch import/export, the
converted-model directory (orbax + manifest) and hub/URL downloads."""
