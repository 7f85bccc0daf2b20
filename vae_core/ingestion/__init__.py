"""The ingestion wing: one run of `ingest-dataset` in the library (`ingest`): open and list the source, find
an unchanged version by its fingerprint, decode parts into content buckets (`mapper`), write each bucket's
shards (`reducer`), publish the version (`publish`), in a work folder that a re-run resumes (`work`); what
the user sees meanwhile (`progress`) and after (`report`). Its steps run their tasks through a `Runner`:
in process here, Ray Data tasks in `flows.distributed.ingest_tasks`.

Rule: it takes the stage's request and returns its result, so it stands above `requests` and `results`;
it imports the `data` wing (format, sources) and nothing of model, training or evaluation. Nothing in
vae_core imports it.
"""
