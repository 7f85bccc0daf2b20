"""Image sources that ingestion reads: folders of image files, MNIST IDX, NumPy, Parquet, built-ins.

`open_source(url, format="auto")` detects the kind and returns a validated `Source` whose batches
yield every item once; see `vae_core.data.sources.base` for the item contract.
"""
