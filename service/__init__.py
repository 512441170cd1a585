"""retinaedge service: the appliance's local HTTP service and DICOM node (docs/architecture.md, "Rooms").

At the top: the app factory (:mod:`.app`), the services it shares (:mod:`.state`), the settings
(:mod:`.settings`), the ``serve`` and ``boot`` verbs (:mod:`.serve_cli`, :mod:`.boot_cli`) and the schema
version of the database the results and the outbox share, with its migrations (:mod:`.database`). One folder
per subsystem below them: :mod:`.routes` (the HTTP endpoints), :mod:`.http` (bodies, problems, schemas,
TLS, metrics), :mod:`.intake` (STOW-RS and the spool), :mod:`.dimse` (the C-STORE SCP), :mod:`.pipeline`
(reading, batching, inference), :mod:`.results` (result documents and their store) and :mod:`.outbox`
(delivering results to PACS destinations). Backends, engines and the benchmark are not here: they are
:mod:`retinaedge.runtime.backends` and :mod:`retinaedge.bench`.
"""
