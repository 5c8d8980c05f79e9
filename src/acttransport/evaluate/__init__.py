"""Evaluation: judges, metrics and sweeps for steered models.

Judges use only embedded offline assets (see :mod:`acttransport.assets`); heavy dependencies
(transformers, scikit-learn) are imported lazily inside the functions that need them.
"""
