"""Trained models over images: tiles, test-time views, both families' raw outputs,
the family interface, fold and family ensembles and out-of-fold outputs. Takes images
and run folders; hands on label images.
"""
