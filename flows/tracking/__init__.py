"""MLflow: runs and their metrics, the model registry and its aliases, the pyfunc flavour, the training
progress read back from a run, and where an evaluation's results go.

Rule: the only place that imports mlflow; it never imports prefect or ray.
"""
