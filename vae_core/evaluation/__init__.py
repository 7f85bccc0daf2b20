"""The evaluation wing: scores on a split (bounds, sharpness, latent metrics, Fréchet distances), the
pictures and HTML report, and the gate that decides a promotion.

Rule: it imports the top-level modules, `model` and `data`; never `training`.
"""
