"""Raw model output -> instances: the seeded watershed of the semantic family,
scored instances with duplicate suppression and overlap resolution, and the tuning of
their thresholds. Takes probability maps or soft instances; hands on label images.
"""
