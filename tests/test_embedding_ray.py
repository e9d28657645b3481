"""Ray Data batch embedding gives the same vectors as in-process encoding, in input order."""

import numpy as np
import pytest

from indexing.embedding import Embedder, embed_local, embed_with_ray


@pytest.fixture(scope="module")
def ray_session():
    import ray

    import indexing.embedding
    from indexing.embedding import ensure_ray

    found = indexing.embedding.running_cluster
    indexing.embedding.running_cluster = lambda: None  # another session's recorded cluster is not ours to join
    try:
        ensure_ray()  # `ragraph index`'s own Ray: a new local one, on loopback
    finally:
        indexing.embedding.running_cluster = found
    yield
    ray.shutdown()


def test_ragraph_index_ray_listens_on_loopback_only(ray_session):
    """The local Ray that Ray Data embedding starts (ensure_ray) listens on 127.0.0.1 only: its GCS,
    raylet, object manager and agents (old code: the machine's network address and ``::``)."""
    import time

    import psutil

    from test_engine_lifecycle import listening_sockets, not_loopback

    time.sleep(1)
    procs = psutil.Process().children(recursive=True)
    names = {p.name() for p in procs if p.is_running()}
    assert {"gcs_server", "raylet"} <= names, names
    sockets = listening_sockets([psutil.Process(), *procs])
    assert sockets and not not_loopback(sockets), f"listening beyond loopback: {not_loopback(sockets)}"


def test_ray_data_matches_local_encoding(ray_session, provisioned):
    texts = [f"passage number {i} about {'wine' if i % 2 else 'shipping'} " + "word " * (i % 17) for i in range(120)]
    e = Embedder(model=str(provisioned["embedder"]), batch_size=16)
    local = embed_local(texts, e, log=lambda _: None)
    nodes: dict[str, int] = {}
    via_ray = embed_with_ray(texts, e, concurrency=2, threads_per_actor=1, nodes=nodes, log=lambda _: None)
    assert via_ray.shape == (120, 384)
    assert np.allclose(np.sum(local * via_ray, axis=1), 1.0, atol=1e-3)  # same vector, same row
    import ray

    assert nodes == {ray.get_runtime_context().get_node_id(): 120}  # one node here; two in tests/multinode
