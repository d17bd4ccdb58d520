"""What a logged model ships with and needs to predict: image preparation, the networks and the
MLflow pyfunc. The stages use it too, so an image is prepared the same way in training and serving.
It imports nothing from `pipeline` but `pipeline.errors` and itself, so it travels alone.
"""

MODEL_NAMES = ("small_cnn", "resnet18", "resnet50", "mobilenet_v3_small")
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
"""Largest image (width x height) that is decoded: guards against decompression bombs."""
DEFAULT_DECODE_MEMORY_MB = 1024
"""Memory that all of a process's decodes may hold at once (a 6300x6300 PNG holds about 160 MB)."""
