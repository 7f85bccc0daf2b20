"""Work on Ray: the session (local or `RAY_ADDRESS`), verified shard reads, the CPU/GPU reservation, and
the per-rank training and encoding workers.

Rule: with the stage flows, the only place that imports ray; it never imports prefect.
"""
