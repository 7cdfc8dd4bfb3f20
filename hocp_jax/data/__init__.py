"""Datasets (TFDS builders, no TensorFlow needed) and the input pipeline.

``embedded``: digits_affect / moving_digits, built offline from sklearn digits.
``afew_va``, ``affectnet``, ``fer2013``, ``jester``: builders for manually downloaded files.
``pipeline``: name + split -> deterministic, host-sharded, resumable batches.
"""
