"""Result delivery to PACS destinations (DIMSE C-STORE or DICOMweb STOW-RS): the destination settings and
types (:mod:`.destinations`: each destination lists the result documents it receives, by kind), the
durable outbox in SQLite (:mod:`.queue`, its tables and triggers in :mod:`.schema`), the senders
(:mod:`.senders`), the delivery threads (:mod:`.delivery`) and their metrics (:mod:`.metrics`). "Export"
in this code base means model export; here results are delivered."""
