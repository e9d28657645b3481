"""The packaged embedder, loaded from the provisioned folder, ranks meaning above words."""

import numpy as np
import pytest


@pytest.fixture(scope="module")
def embedder(provisioned):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(provisioned["embedder"]), device="cpu")


def test_paraphrases_are_closer_than_an_unrelated_sentence(embedder):
    a = "The retriever replicas switch to the new index without dropping requests."
    b = "Requests keep being served while retriever copies move over to the fresh index."
    unrelated = "Preheat the oven to 200 degrees before baking the bread."
    va, vb, vu = embedder.encode([a, b, unrelated], normalize_embeddings=True)
    assert float(va @ vb) > float(va @ vu) + 0.3


def test_vectors_are_normalised_384_dims(embedder):
    v = embedder.encode(["one", "two"], normalize_embeddings=True)
    assert v.shape == (2, 384)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
