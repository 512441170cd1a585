"""Synthetic brain MR studies for the demo model and examples (development tooling, not the runtime).

Derived from the MNI ICBM152 2009a T1 template shipped in nilearn's wheel: see NOTICE-MNI-ICBM152.txt.
Nothing made here is a patient image, and nothing trained on it is for clinical use.
"""
