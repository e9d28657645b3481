"""The service's state in a real database, shared by every ingress replica: API keys, token usage,
conversations and feedback, ingest jobs (a SQLite file on the embedded default, PostgreSQL on a
cluster: :mod:`state.db`), its schema made and upgraded by Alembic migrations (``state/migrations``).
Each store is a typed port (:mod:`state.ports`) with one SQL implementation."""
