"""Scoring: per-image and per-modality summaries of out-of-fold and external
predictions, and leaderboard-style ablations. Takes label images and runs; hands on
tables.
"""
