"""Model families' builders and what a model is on disk: configuration, the U-Net++ and
Mask R-CNN builders, losses, compact weights, mixed precision and run folders. Takes a
configuration; hands on torch modules and their files.
"""
