"""ImageNet's channel statistics: what every pipeline normalises with and every
manifest records (no TensorFlow here, so reading a model needs none)."""

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
