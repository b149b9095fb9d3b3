"""Images and label images in and out: reading the data layouts, modality, training
crops (dataset, targets, augmentation, external sources), nucleus size, and the
pictures and outlines written for people. Takes files; hands on arrays and samples.
"""
