"""Corpora, tokenizers and the tf.data input pipeline."""
