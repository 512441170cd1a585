"""A model's versions on the appliance: staged bundles, the active one, rollback, the silent trial.

- ``registry``: the versions of one model under ``<data_dir>/models/<name>/`` and which is active
  (``state.json``, written atomically: the active version survives restarts and SIGKILLs);
- ``archive``: a bundle uploaded as a tar archive, unpacked under limits (no links, no paths outside);
- ``shadow``: how a version on trial agrees with the active one (the export's parity rule).
"""
