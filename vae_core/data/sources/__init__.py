"""Image sources that ingestion reads: folders of image files, MNIST IDX, NumPy, Parquet, built-ins.

Each source module declares its `Format` (`base.Format`: name, how it is recognised, how it opens) and
`formats.REGISTRY` lists them: the request's `format` choices and detection derive from it.
`open_source(url, format="auto")` (`detect`) detects the kind and returns a validated `Source` whose
batches yield every item once; see `vae_core.data.sources.base` for the item contract.
"""
