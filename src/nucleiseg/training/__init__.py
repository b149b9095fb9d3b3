"""Training and what ships from it: the engine shared by both families, torchrun,
fine-tuning, learning curves, the reference bundle, and the input checks every command
runs before any model loads. Takes data, folds and a configuration; hands on runs and
bundles.
"""
