"""retinaedge runtime: model bundles, backends and the inference loop.

Nothing here imports torch, tensorrt or pycuda at import time.
"""

__version__ = "0.1.0"
