"""Code the tests share (``from support.<module> import ...``: ``pyproject.toml`` puts ``tests/`` on
``sys.path`` through pytest's ``pythonpath``). Test modules never import each other, only this package.

- :mod:`support.paths`: the repository root and the data the tests read (demo bundle, examples, fixtures,
  pydicom's corpus);
- :mod:`support.polling`: the one wait-until loop (``poll``, ``wait_until``), each caller its own bounds;
- :mod:`support.certs`: self-signed test certificates (openssl);
- :mod:`support.servers`: free ports, ``retinaedge serve`` as a subprocess or the app under uvicorn in a
  thread, readiness;
- :mod:`support.clients`: requests to a running service (``/v1/detect``, results, multipart bodies);
- :mod:`support.forkserver`: a pre-imported launcher of ``retinaedge serve`` processes;
- :mod:`support.engines`: a fixed "this device" and engine-cache entries for the backend choice;
- :mod:`support.models`: torchvision RetinaNets with biased heads for exports (the export extra);
- :mod:`support.blocked`: a Python where torch, torchvision, TensorRT and pycuda cannot be imported;
- :mod:`support.tegrastats`: recorded tegrastats lines and a stand-in that replays them;
- :mod:`support.dicomgen`: synthetic DICOM instances;
- :mod:`support.peers_dcmtk`, :mod:`support.peers_orthanc`: real DICOM peers from Debian's packages.
"""
