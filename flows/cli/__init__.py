"""The `vae` command: its app, how a request is read from options, how an outcome is printed, how a flow
runs in-process or on Prefect, and the demo.

Rule: the top of the house: nothing under `flows/` or `vae_core/` imports it.
"""
