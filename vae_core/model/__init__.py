"""The model wing: the network (`vae.ConvVAE`), its posterior and likelihoods, losses and bounds, the
discriminator and feature classifier, weights on disk, encoding, pictures and configuration.

Rule: it imports only the top-level `vae_core` modules (errors, settings, names, storage); never data,
training or evaluation, and never pyarrow.
"""
