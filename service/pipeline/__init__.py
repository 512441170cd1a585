"""The serving pipeline: the detector opened on the inference thread (:mod:`.opener`), CPU stages and the
inference thread (:mod:`.stages`), dynamic batching (:mod:`.batching`), one admitted instance and its
frames (:mod:`.jobs`), and the durable processing of acknowledged instances (:mod:`.processor`)."""
