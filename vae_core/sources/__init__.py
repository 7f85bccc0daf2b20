"""Image sources that ingestion reads: folders of image files, MNIST IDX, NumPy, Parquet, built-ins."""
