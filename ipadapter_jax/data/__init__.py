"""Training data: TFDS datasets built without TensorFlow (`builder`), preprocessing, the grain loader, the
embedding cache and the procedural dataset of the embedded world (`synthetic`)."""
