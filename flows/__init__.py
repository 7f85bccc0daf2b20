"""Prefect flows for each stage, the `vae` command line, and the only code that touches Ray and MLflow."""
