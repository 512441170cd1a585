"""``retinaedge export-triton``: a model bundle -> a Triton Inference Server model repository
(:mod:`.repo`), its ``config.pbtxt`` (:mod:`.config`), engines from the device's engine cache
(:mod:`.engines`), the python-backend model file (:mod:`.python_model`, copied as ``model.py``) and the
verb (:mod:`.export_triton_cli`)."""
