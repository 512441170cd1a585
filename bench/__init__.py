"""``retinaedge benchmark``: what a technician runs on the target hardware.

The top of the import graph: it measures the service (:mod:`retinaedge.service`), the runtime and its
backends, exports its model configurations (:mod:`retinaedge.export`) and reads the device
(:mod:`retinaedge.device`); nothing imports it.

One module per job:

- :mod:`.stats`: percentiles and summaries of latency samples;
- :mod:`.inputs`: the DICOM files a run uses, in a fixed order, until N frames;
- :mod:`.graphs`: the heads-only and the post-processing-only ONNX models derived from ``model.onnx``;
- :mod:`.pypost`: the baseline post-processing in numpy (decode + class-wise NMS, torchvision semantics);
- :mod:`.worker`: the runners that execute in their own process (fused ONNX Runtime, heads + Python);
- :mod:`.processes`: starting a runner in a fresh process and reading its result;
- :mod:`.http_phase`: the HTTP phase against a real ``retinaedge serve`` subprocess;
- :mod:`.steady`: a load level that runs until its frames/s hold still (three windows within 10 %);
- :mod:`.accelerator`: the simulated accelerator (a + b n ms per batch, off the CPU; recorded outputs),
  an instrument of the benchmark and never a backend the service can choose; :mod:`.recording` its
  first pass, :mod:`.accel_serve` the benchmark's own service process that registers it,
  :mod:`.accel_phase` the levels measured against it, :mod:`.threadcpu` the service's CPU by thread;
- :mod:`.batch_settings`: the service's batching settings for that phase (``--max-batch-size``, ``--batch-delay-ms``);
- :mod:`.configs`: ``--config``, a benchmark configuration's bundle (exported in its own process by
  :mod:`.models`, the model sizes users bring);
- :mod:`.summarize`: the report dictionary from the raw results;
- :mod:`.report`, :mod:`.accel_report` and :mod:`.plot`: ``report.json``, ``report.md`` and the latency PNG;
- :mod:`.benchmark_cli`: the verb, which runs the phases in order.

The torchvision eager baseline, :mod:`.eager`, runs in its own process (the benchmark starts it as a
subprocess): only there are torch and the export package's checkpoint loader imported.
"""
