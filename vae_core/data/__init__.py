"""The data wing: the dataset format (Parquet shards, manifests, splits), ingestion from every source
(`sources/`), and the embeddings that encoding writes.

Rule: it imports the top-level `vae_core` modules and `model` (for a model's identity and configuration),
never training or evaluation, and never torch at import time except through `model`.
"""
