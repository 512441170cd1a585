"""retinaedge device: what the appliance runs on (docs/architecture.md, packages and threads).

Pure parsers turn recorded text into frozen dataclasses:

- :mod:`.l4t`: ``/etc/nv_tegra_release`` -> L4T release and JetPack version;
- :mod:`.module`: ``/proc/device-tree/model`` and ``compatible`` -> module, part number, SoC;
- :mod:`.power`: ``nvpmodel -q`` -> power mode; ``jetson_clocks --show`` -> clocks and whether pinned;
- :mod:`.tegrastats`: one ``tegrastats`` line -> memory, CPU/GPU load and clocks, temperatures, rails;
- :mod:`.linux`: ``/proc/cpuinfo``, ``/proc/meminfo``, ``nvidia-smi`` CSV for non-Jetson machines.

:mod:`.collect` reads the real files (under a configurable root) and commands (with timeouts) into a
:class:`~.collect.DeviceReport`; :mod:`.sampler` runs ``tegrastats`` in the background and integrates
rail power into energy; :mod:`.cli` is the ``retinaedge device`` verb.

TensorRT engines for this device:

- :mod:`.fingerprint`: :class:`~.fingerprint.DeviceFingerprint` (what an engine depends on) and
  :class:`~.fingerprint.DeviceCapabilities`, probed through TensorRT and :mod:`.cuda`;
- :mod:`.buildopts`: :class:`~.buildopts.BuildOptions` and their validation against device and model;
- :mod:`.enginecache`: engines keyed by model, options and fingerprint; atomic writes, typed lookups;
- :mod:`.trt_build` (ONNX -> engine), :mod:`.trt_backend` (engine -> ``infer``), :mod:`.cuda` (the only
  module that imports pycuda); :mod:`.errors`, this package's exceptions.

This package imports nothing from the rest of retinaedge and nothing heavy at import time (TensorRT and pycuda only inside the functions
that need them; versions for the report come from ``importlib.metadata`` and files).
"""
