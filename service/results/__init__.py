"""Results: what is kept of each instance's header (:mod:`.evidence`), the SQLite record of instances and
results (:mod:`.store`, its tables in :mod:`.schema`, written in groups by :mod:`.writer`; what counts as
a storage error and how writes are retried: :mod:`.storage`), series completion and 3D findings
(:mod:`.completion`), and the result documents:

- one registry of them by kind (:mod:`.documents`: ``sr``, ``series-sr``, ``gsps``, ``sc``, ``kos``), what
  they are built from (:mod:`.views`), which detections they show (:mod:`.selection`: findings only);
- the builders: DICOM SR (:mod:`.sr`), the presentation state (:mod:`.gsps`), the secondary captures
  (:mod:`.sc`, made and kept as files by :mod:`.captures`), the key object selection of a study
  (:mod:`.kos`, its images with findings from :mod:`.key_images`); what every document shares (series,
  equipment, identity: :mod:`.dicomdoc`) and this appliance's identity in them (:mod:`.appliance`);
- the formats and Accept/``?document=`` negotiation of ``GET /v1/results``, ``/v1/series`` and
  ``/v1/studies`` (:mod:`.formats`).
"""
