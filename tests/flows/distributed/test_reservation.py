"""The one CPU/GPU reservation of Ray workers (train-vae's ranks, encode-dataset's actors)."""

from __future__ import annotations

import pytest

from flows.distributed.cluster import reserve
from vae_core.errors import EncodeError, TrainError
from vae_core.requests import EncodeRequest, TrainRequest

MODEL = "models:/vae-mnist@champion"


def test_default_leaves_a_share_for_ray_and_threads_follow_the_machine():
    two, eight = {"CPU": 2.0}, {"CPU": 8.0}
    train = TrainRequest(dataset="mnist", workers=2)
    assert reserve(two, train, TrainError, spare=None, min_cpus=0.1) == (0.9, 1)  # 10% left over
    assert reserve(eight, train, TrainError, spare=1.0, min_cpus=0.1) == (3.5, 4)  # a whole CPU left over
    encode = EncodeRequest(model=MODEL, dataset="mnist", workers=4)
    # (2 - 1) / 4 is under the floor: each actor still reserves min_cpus.
    assert reserve(two, encode, EncodeError, spare=1.0, min_cpus=0.5) == (0.5, 1)
    assert reserve(eight, EncodeRequest(model=MODEL, dataset="mnist", workers=3), EncodeError, spare=1.0,
                   min_cpus=0.5) == (2.33, 3)


def test_explicit_cpus_win_and_threads_follow_what_the_caller_says():
    req = TrainRequest(dataset="mnist", workers=2, cpus_per_worker=3)
    assert reserve({"CPU": 8.0}, req, TrainError, spare=None, min_cpus=0.1) == (3, 4)  # threads: the share
    assert reserve({"CPU": 8.0}, req, TrainError, spare=None, min_cpus=0.1, threads=req.cpus_per_worker) == (3, 3)


def test_more_than_the_cluster_has_is_the_stages_error():
    with pytest.raises(EncodeError, match=r"2 workers x 1.5 CPUs exceed the cluster's 2 CPUs"):
        reserve({"CPU": 2.0}, EncodeRequest(model=MODEL, dataset="mnist", workers=2, cpus_per_worker=1.5),
                EncodeError, spare=1.0, min_cpus=0.5)
    with pytest.raises(TrainError, match=r"1 workers x 1.0 GPUs exceed the cluster's 0 GPUs"):
        reserve({"CPU": 2.0}, TrainRequest(dataset="mnist", gpus_per_worker=1), TrainError, spare=None, min_cpus=0.1)
    assert reserve({"CPU": 2.0, "GPU": 2.0}, TrainRequest(dataset="mnist", workers=2, gpus_per_worker=1), TrainError,
                   spare=None, min_cpus=0.1) == (0.9, 1)


def test_ray_data_beside_the_workers_keeps_a_whole_cpu_free():
    req = TrainRequest(dataset="mnist", workers=2, cpus_per_worker=0.9)
    assert reserve({"CPU": 2.0}, req, TrainError, spare=1.0, min_cpus=0.1) == (0.9, 1)  # nothing streams
    with pytest.raises(TrainError, match=r"2 workers x 0.9 CPUs leave less than one CPU of the cluster's 2 for "
                                         r"Ray Data, which streams: lower it"):
        reserve({"CPU": 2.0}, req, TrainError, spare=1.0, min_cpus=0.1, data_cpu="which streams: lower it")


def test_a_reservation_fits_the_nodes_not_only_the_cluster():
    """One worker runs on one node. On nodes of 2 and 1 CPUs (3 in all), one encode actor gets the cluster less
    its spare CPU, 2, which the larger node holds; two ranks of (3 - 0.3) / 2 = 1.35 would fit no second node
    (a hang in Ray), so they get 1 CPU each; asking for more than a node holds is the stage's error naming the
    nodes."""
    from flows.distributed.cluster import with_node_cpus

    nodes = [{"Alive": True, "Resources": {"CPU": 2.0}}, {"Alive": True, "Resources": {"CPU": 1.0}},
             {"Alive": False, "Resources": {"CPU": 8.0}}]
    two_hosts = with_node_cpus({"CPU": 3.0}, nodes)
    assert reserve(two_hosts, EncodeRequest(model=MODEL, dataset="mnist"), EncodeError, spare=1.0,
                   min_cpus=0.5)[0] == 2.0
    assert reserve(two_hosts, TrainRequest(dataset="mnist", workers=2), TrainError, spare=None,
                   min_cpus=0.1)[0] == 1.0
    one_node = with_node_cpus({"CPU": 2.0}, nodes[:1])
    assert reserve(one_node, TrainRequest(dataset="mnist", workers=3), TrainError, spare=0.0,
                   min_cpus=0.1)[0] == 0.66  # 2 / 3 rounded to 0.67 would fit two of them
    with pytest.raises(EncodeError, match=r"1 workers x 2.5 CPUs: the cluster's nodes \(2, 1 CPUs\) hold 0"):
        reserve(two_hosts, EncodeRequest(model=MODEL, dataset="mnist", cpus_per_worker=2.5), EncodeError,
                spare=0.0, min_cpus=0.5)
