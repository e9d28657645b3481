import os
from pathlib import Path

import pytest

# Models come from packages; a test must never reach for a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
RESULTS_ENV = "RAGRAPH_RESULTS_DIR"


def results_file(name: str) -> Path | None:
    """Where a suite that measures writes its report: ``$RAGRAPH_RESULTS_DIR/name`` when that is set
    (``RAGRAPH_RESULTS_DIR=load_tests/results`` to refresh the committed results), else nowhere:
    tests never rewrite tracked files unasked."""
    folder = os.environ.get(RESULTS_ENV)
    return Path(folder).resolve() / name if folder else None


@pytest.fixture(scope="session")
def app_config():
    from common.config import load_config

    return load_config(environ={k: v for k, v in os.environ.items() if k.startswith("RAGRAPH")})


@pytest.fixture(scope="session")
def provisioned(app_config):
    """The configured model folder, provisioned (a no-op after `make test` has run `ragraph models`)."""
    from cli.models import provision_all

    reports = provision_all(app_config.models, log=lambda _: None)
    return {r.role: Path(r.location) for r in reports}


CORPUS = {
    "wine/reds.md": "# Red wines\n\nOur cellar holds pinot noir and cabernet sauvignon from the Napa valley, "
    "aged eighteen months in French oak barrels.",
    "wine/whites.md": "# White wines\n\nChardonnay and riesling are served chilled; the riesling has notes of "
    "green apple and lime.",
    "club/membership.md": "# Membership\n\nClub members receive four shipments a year and can cancel at any time "
    "from their account page.",
    "visiting/hours.md": "# Opening hours\n\nThe tasting room is open from 10 am to 6 pm, Tuesday through Sunday. "
    "Parking is free for visitors.",
    "merchandise/shop.md": "# Shop\n\nCorkscrews, decanters and gift boxes are sold in the online shop and "
    "shipped within two days.",
    "merchandise/returns.md": "# Returns\n\nDamaged bottles are refunded within 30 days of delivery; send a "
    "photo of the broken bottle.",
}


def write_corpus(folder: Path, docs: dict[str, str] = CORPUS) -> Path:
    for rel, text in docs.items():
        p = folder / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return folder


def indexed_config(local_cfg, base: Path, docs: dict[str, str] = CORPUS) -> dict:
    """A graph test's config as a dict to adjust: ``docs`` written to ``base/src`` and indexed into
    ``base/index`` (``data["indexing"]["dir"]``), which the retriever re-reads every 0.5 s."""
    from indexing.jobs import index_source

    root = base / "index"
    index_source(local_cfg, write_corpus(base / "src", docs), root, log=lambda _: None)
    data = local_cfg.model_dump()
    data["indexing"]["dir"] = str(root)
    data["retriever"]["reload_interval_s"] = 0.5
    return data


@pytest.fixture(scope="session")
def local_cfg(app_config, provisioned, tmp_path_factory):
    """The app config with in-process embedding (no Ray) for small test corpora, and the
    governor's key and usage database in a temporary folder (never the user's)."""
    db = tmp_path_factory.mktemp("governor") / "governor.sqlite3"
    return app_config.model_copy(update={
        "indexing": app_config.indexing.model_copy(update={"engine": "local"}),
        "governor": app_config.governor.model_copy(update={"db": db}),
        # the query log (serve/querylog.py) of in-process apps goes beside it, not into the user's folder
        "observability": app_config.observability.model_copy(update={
            "query_log": app_config.observability.query_log.model_copy(update={"path": db.parent / "queries.jsonl"})}),
        # the service tests exercise the generator: the local default answers extractively and declines
        # weak retrievals (docs/evaluation.md); tests of those set them on their own copy
        "generator": app_config.generator.model_copy(update={
            "answer_mode": "generate", "abstain_min_similarity": 0.0, "abstain_min_coverage": 0.0}),
    })


@pytest.fixture(scope="session")
def built_index(tmp_path_factory, local_cfg):
    """An index of CORPUS, built once per session: (source folder, index root)."""
    from indexing.jobs import index_source

    base = tmp_path_factory.mktemp("corpus")
    source = write_corpus(base / "src")
    root = base / "index"
    index_source(local_cfg, source, root, log=lambda _: None)
    return source, root


# --- the end of the session ----------------------------------------------------------------------
# The suite loads native runtimes into this process (torch, vLLM's engine client, Ray's core worker,
# faiss). Once every test has run and the summary is printed, their threads can still crash the
# interpreter while it finalises (CI saw "Segmentation fault" after "363 passed"), which turns a
# green run red. So the session ends with pytest's own exit status through os._exit, after Ray is
# shut down and any child process this run left behind (a vLLM engine core, a Ray worker) is stopped.

_EXIT: dict[str, int] = {}


def pytest_sessionfinish(session, exitstatus):
    _EXIT["status"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if "status" not in _EXIT or os.environ.get("RAGRAPH_TEST_SOFT_EXIT"):
        return
    import sys

    if "ray" in sys.modules:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except Exception:  # shutting down is best effort; the status below is what matters
            pass
    try:
        import psutil

        children = psutil.Process().children(recursive=True)
        for child in children:
            child.terminate()
        _, alive = psutil.wait_procs(children, timeout=5)
        for child in alive:
            child.kill()
    except Exception:
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT["status"])


# ---------------------------------------------------------------------------------------------
# real PostgreSQL and Redis servers (tests/servers.py)


@pytest.fixture(scope="session")
def postgres_url():
    """The SQLAlchemy URL of a real PostgreSQL server for the whole session (database ``ragraph``)."""
    from servers import PostgresServer

    server = PostgresServer()
    try:
        yield server.url
    finally:
        server.close()


@pytest.fixture(scope="session")
def redis_url():
    """``redis://127.0.0.1:PORT/0`` of a real redis-server for the whole session."""
    from servers import RedisServer

    server = RedisServer()
    try:
        yield server.url
    finally:
        server.close()


@pytest.fixture
def postgres_server():
    """A PostgreSQL server of this test's own, which it may stop and start again."""
    from servers import PostgresServer

    server = PostgresServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_server():
    """A redis-server of this test's own, which it may stop and start again."""
    from servers import RedisServer

    server = RedisServer()
    try:
        yield server
    finally:
        server.close()


# ---------------------------------------------------------------------------------------------
# the state stores on a SQLite file (the embedded default's governor.db)


def keys_at(path):
    """The API keys (:class:`state.keys.SqlKeys`) of the SQLite state file ``path``, its schema at head."""
    from state.db import Database, sqlite_url
    from state.keys import SqlKeys

    db = Database(sqlite_url(path))
    db.upgrade()
    return SqlKeys(db)


def usage_at(path):
    """The usage ledger (:class:`state.usage.SqlUsage`) of the SQLite state file ``path``."""
    from state.db import Database, sqlite_url
    from state.usage import SqlUsage

    db = Database(sqlite_url(path))
    db.upgrade()
    return SqlUsage(db)


def governor_for(governor_cfg):
    """A :class:`deployments.governor.Governor` for a ``governor`` config section alone (its SQLite
    file ``governor_cfg.db``, the default state settings)."""
    from types import SimpleNamespace

    from common.config import StateConfig
    from deployments.governor import Governor

    return Governor(SimpleNamespace(governor=governor_cfg, state=StateConfig()))
