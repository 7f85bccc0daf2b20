"""The data wing: the dataset format (`shards/`: Parquet shards, manifests, readers; `splits`), the image
sources that ingestion reads and their listings (`sources/`), the embeddings format that encoding writes
(`embeddings/`), and where an encode may write (`output_location`).

Rule: it imports the top-level modules and `model` (a model's configuration and identity); never training,
evaluation or ingestion, nor the requests and results (which take their source formats from here).
"""
