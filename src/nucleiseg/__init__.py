"""Nucleus instance segmentation for the 2018 Data Science Bowl.

    import nucleiseg

    model = nucleiseg.load("weights")
    labels = model.segment(image)

:func:`load` and :class:`Segmenter` come from :mod:`nucleiseg.api`, imported
at their first use, so that ``import nucleiseg`` stays light (no torch).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("load", "Segmenter"):
        from nucleiseg import api

        return getattr(api, name)
    raise AttributeError(f"module 'nucleiseg' has no attribute {name!r}")
