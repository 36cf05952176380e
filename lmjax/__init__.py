"""lmjax: JAX/TPU-native language model training."""

import os

# TensorFlow is used only for tf.data and tfds; keep it quiet and off accelerators.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

__version__ = '0.1.0'
