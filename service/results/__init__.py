"""Results: what is kept of each instance's header (:mod:`.evidence`), the SQLite record of instances and
results (:mod:`.store`, written in groups by :mod:`.writer`), series completion and 3D findings
(:mod:`.completion`), and the result documents: DICOM SR (:mod:`.sr`) and the formats and Accept
negotiation of ``GET /v1/results`` (:mod:`.formats`)."""
