"""Input data: sources (synthetic, image folders, TFDS), JPEG decoding, the tf.data
pipeline and the host-side augmentation. Imports TensorFlow (the modules, not this
package)."""
