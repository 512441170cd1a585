"""DIMSE: the service on the hospital's DICOM network (a C-STORE SCP: :mod:`.scp`)."""
