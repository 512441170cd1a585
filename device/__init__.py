"""retinaedge device: the machine's facts (docs/architecture.md, "Rooms").

Pure parsers turn recorded text into frozen dataclasses:

- :mod:`.l4t`: ``/etc/nv_tegra_release`` -> L4T release and JetPack version;
- :mod:`.module`: ``/proc/device-tree/model`` and ``compatible`` -> module, part number, SoC;
- :mod:`.power`: ``nvpmodel -q`` -> power mode; ``jetson_clocks --show`` -> clocks and whether pinned;
- :mod:`.tegrastats`: one ``tegrastats`` line -> memory, CPU/GPU load and clocks, temperatures, rails;
- :mod:`.linux`: ``/proc/cpuinfo``, ``/proc/meminfo``, ``nvidia-smi`` CSV for non-Jetson machines.

:mod:`.collect` reads the real files (under a configurable root) and commands (with timeouts) into a
:class:`~.collect.DeviceReport`; :mod:`.sampler` runs ``tegrastats`` in the background and integrates
rail power into energy; :mod:`.device_cli` is the ``retinaedge device`` verb.

This package imports nothing from the rest of retinaedge (the TensorRT backend,
:mod:`retinaedge.runtime.backends.tensorrt`, reads the L4T release from here for its fingerprint) and
nothing heavy at import time (versions for the report come from ``importlib.metadata`` and files).
"""
