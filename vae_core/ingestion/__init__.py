"""The ingestion wing: one run of `ingest-dataset` in the library: open the source, find an unchanged
version by its fingerprint, build the splits and shards (`builder`), publish the version (`ingest`).

Rule: it takes the stage's request and returns its result, so it stands above `requests` and `results`;
it imports the `data` wing (format, sources) and nothing of model, training or evaluation. Nothing in
vae_core imports it.
"""
