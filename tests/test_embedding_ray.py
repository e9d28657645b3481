"""Ray Data batch embedding gives the same vectors as in-process encoding, in input order."""

import numpy as np
import pytest

from indexing.embedding import Embedder, embed_local, embed_with_ray


@pytest.fixture(scope="module")
def ray_session():
    import ray

    from deployments.llm_adapter import init_ray
    from indexing.embedding import ensure_ray

    init_ray(include_dashboard=False, log_to_driver=False)  # on loopback, as serve.launch starts it
    ensure_ray()  # finds it started
    yield
    ray.shutdown()


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
