"""Deployment: export to ONNX/OpenVINO/LiteRT/jax.export, the hand-built ONNX graph,
the runtimes that run the artifacts, and `predict`."""
