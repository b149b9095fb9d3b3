"""The DSB 2018 competition core: run-length encoding, the exact metric, submissions,
ground truth in the competition's forms, and cross-validation folds. Takes label
images; hands on scores, CSV rows and fold assignments.
"""
