"""The training wing: the setup and its one epoch loop (`fit`: `Fit.run`), what a runner plugs into that loop
(`hooks`), one step and one pass (`loop`), the objectives (KL, reconstruction, adversarial, perceptual) and
device metrics.

Rule: it imports the top-level modules, `model` and `data`; never `evaluation`.
"""
