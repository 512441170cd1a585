"""Results: what is kept of each instance's header (:mod:`.evidence`), the SQLite record of instances and
results (:mod:`.store`, its tables in :mod:`.schema`, written in groups by :mod:`.writer`), series
completion and 3D findings (:mod:`.completion`), and the result documents: one registry of them by kind
(:mod:`.documents`: ``sr``, ``series-sr``), what they are built from (:mod:`.views`), the DICOM SR builders
(:mod:`.sr`), and the formats and Accept negotiation of ``GET /v1/results`` and ``/v1/series``
(:mod:`.formats`)."""
