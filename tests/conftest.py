import os
from pathlib import Path

import pytest

# Models come from packages; a test must never reach for a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def app_config():
    from serve.config import load_config

    return load_config(environ={k: v for k, v in os.environ.items() if k.startswith("RAGRAPH")})


@pytest.fixture(scope="session")
def provisioned(app_config):
    """The configured model folder, provisioned (a no-op after `make test` has run `ragraph models`)."""
    from serve.models import provision_all

    reports = provision_all(app_config.models, log=lambda _: None)
    return {r.role: Path(r.location) for r in reports}
