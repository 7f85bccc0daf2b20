#!/bin/sh
# with-ray-node COMMAND...: join the Ray cluster at $RAY_ADDRESS as a node with no CPUs and no GPUs, then
# run COMMAND. A process that calls ray.init(address="host:6379") is a driver, and a driver must run on
# a node of the cluster (its objects live in that node's object store); this container becomes one.
# Nothing is joined when RAY_ADDRESS is unset, `auto`, `local` or a Ray Client URL (ray://).
set -eu
case "${RAY_ADDRESS:-}" in
  "" | auto | local | ray://*) ;;
  *) ray start --address="${RAY_ADDRESS}" --num-cpus=0 --num-gpus=0 --disable-usage-stats ;;
esac
exec "$@"
