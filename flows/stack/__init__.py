"""The local stack (`vae stack up|down|status`): the MLflow server, the Prefect server and worker, and a Ray
head, as processes under `$VAE_HOME/stack/`.

Rule: it starts the services; it imports no stage flow.
"""
