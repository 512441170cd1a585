"""Receiving instances durably: DICOMweb STOW-RS (:mod:`.stow`, with the streamed ``multipart/related``
parser :mod:`.multipart`), the spool on disk (:mod:`.spool`) and :mod:`.ingest`, the one path from
received bytes to an acknowledged instance that STOW-RS and the C-STORE SCP (:mod:`retinaedge.service.dimse`)
share."""
