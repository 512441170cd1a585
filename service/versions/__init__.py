"""A model's versions on the appliance: staged bundles, the active one, rollback, the silent trial.

- ``registry``: the versions of one model under ``<data_dir>/models/<name>/`` and which is active
  (``state.json``, written atomically: the active version survives restarts and SIGKILLs);
- ``archive``: a bundle uploaded as a tar archive, unpacked under limits (no links, no paths outside);
- ``upload``: an uploaded archive received and unpacked within the data volume's reserve;
- ``shadow``: how a version on trial agrees with the version it is compared against (the export's parity
  rule), one comparison per baseline version;
- ``record``: the trial's record (``shadow.jsonl``), bounded, from which a restart rebuilds its report.
"""
