"""Baseline: the schema of the governor's SQLite file before migrations (keys, usage, conversations,
turns, answered request ids, feedback), and the ingest jobs that had a file of their own.

A database made by that code (any of its versions) is brought to this schema in place: missing
tables made, missing columns added, tables once keyed by request id alone re-keyed by (owner,
request id), rows kept. An empty database (SQLite or PostgreSQL) gets it whole.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Columns added to the pre-migration file over its life: an older file gets them (rows get the defaults).
ADDED_COLUMNS = {
    "api_keys": (("daily_budget", sa.Float()),),
    "usage": (("prefill_s", sa.Float()), ("decode_s", sa.Float()), ("cost", sa.Float())),
}
REKEYED = {"chat_requests": ("owner", "request_id"), "feedback": ("owner", "request_id")}


def tables() -> dict[str, tuple]:
    return {
        "api_keys": (
            sa.Column("id", sa.Text(), primary_key=True),
            sa.Column("name", sa.Text(), nullable=False),
            sa.Column("scope", sa.Text(), nullable=False),
            sa.Column("token_sha256", sa.Text(), nullable=False),
            sa.Column("created", sa.Float(), nullable=False),
            sa.Column("revoked", sa.Float()),
            sa.Column("chat_per_min", sa.Float()),
            sa.Column("search_per_min", sa.Float()),
            sa.Column("other_per_min", sa.Float()),
            sa.Column("daily_tokens", sa.BigInteger()),
            sa.Column("monthly_tokens", sa.BigInteger()),
            sa.Column("daily_budget", sa.Float()),
        ),
        "usage": (
            sa.Column("key_id", sa.Text(), primary_key=True),
            sa.Column("period", sa.Text(), primary_key=True),  # 'YYYY-MM-DD' (UTC day) or 'YYYY-MM' (UTC month)
            sa.Column("requests", sa.BigInteger(), nullable=False),
            sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
            sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
            sa.Column("prefill_s", sa.Float(), nullable=False, server_default="0"),
            sa.Column("decode_s", sa.Float(), nullable=False, server_default="0"),
            sa.Column("cost", sa.Float(), nullable=False, server_default="0"),
        ),
        "conversations": (
            sa.Column("id", sa.Text(), primary_key=True),
            sa.Column("owner", sa.Text(), nullable=False),
            sa.Column("title", sa.Text(), nullable=False),
            sa.Column("created", sa.Float(), nullable=False),
            sa.Column("updated", sa.Float(), nullable=False),
        ),
        "turns": (
            sa.Column("conversation_id", sa.Text(), primary_key=True),
            sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=False),
            sa.Column("request_id", sa.Text(), nullable=False),
            sa.Column("question", sa.Text(), nullable=False),
            sa.Column("answer", sa.Text(), nullable=False),
            sa.Column("rag", sa.Text(), nullable=False),  # JSON: sources and metadata
            sa.Column("created", sa.Float(), nullable=False),
        ),
        "chat_requests": (
            sa.Column("owner", sa.Text(), primary_key=True),
            sa.Column("request_id", sa.Text(), primary_key=True),
            sa.Column("conversation_id", sa.Text()),
            sa.Column("created", sa.Float(), nullable=False),
        ),
        "feedback": (
            sa.Column("owner", sa.Text(), primary_key=True),
            sa.Column("request_id", sa.Text(), primary_key=True),
            sa.Column("conversation_id", sa.Text()),
            sa.Column("score", sa.Integer(), nullable=False),
            sa.Column("comment", sa.Text()),
            sa.Column("created", sa.Float(), nullable=False),
            sa.Column("updated", sa.Float(), nullable=False),
        ),
        "jobs": (
            sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=True),
            sa.Column("id", sa.Text(), unique=True, nullable=False),
            sa.Column("kind", sa.Text(), nullable=False),
            sa.Column("status", sa.Text(), nullable=False),
            sa.Column("created_at", sa.Float(), nullable=False),
            sa.Column("started_at", sa.Float()),
            sa.Column("finished_at", sa.Float()),
            sa.Column("heartbeat_at", sa.Float()),
            sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
            sa.Column("owner", sa.Text()),
            sa.Column("owner_host", sa.Text()),
            sa.Column("owner_pid", sa.Integer()),
            sa.Column("key_id", sa.Text()),
            sa.Column("inputs", sa.Text(), nullable=False),
            sa.Column("progress", sa.Text(), nullable=False, server_default="{}"),
            sa.Column("failures", sa.Text(), nullable=False, server_default="[]"),
            sa.Column("result", sa.Text()),
            sa.Column("error", sa.Text()),
        ),
    }


INDEXES = (
    ("conversations_owner", "conversations", ("owner", "updated")),
    ("conversations_updated", "conversations", ("updated",)),
    ("chat_requests_created", "chat_requests", ("created",)),
    ("feedback_updated", "feedback", ("updated",)),
    ("feedback_conversation", "feedback", ("conversation_id",)),
    ("jobs_status", "jobs", ("status", "seq")),
)


def upgrade() -> None:
    bind = op.get_bind()
    have = set(sa.inspect(bind).get_table_names())
    for name, columns in tables().items():
        if name not in have:
            op.create_table(name, *columns, sqlite_autoincrement=name == "jobs")
            continue
        # a table of the pre-migration file: bring it to this schema, rows kept
        insp = sa.inspect(bind)
        cols = {c["name"] for c in insp.get_columns(name)}
        for col, type_ in ADDED_COLUMNS.get(name, ()):
            if col not in cols:
                default = None if name == "api_keys" else "0"
                op.add_column(name, sa.Column(col, type_, nullable=default is None, server_default=default))
        if name in REKEYED and tuple(insp.get_pk_constraint(name)["constrained_columns"]) == ("request_id",):
            keep = [c.name for c in columns]
            op.rename_table(name, f"{name}_unkeyed")
            op.create_table(name, *tables()[name])
            listed = ", ".join(keep)
            op.execute(f"INSERT INTO {name} ({listed}) SELECT {listed} FROM {name}_unkeyed "
                       f"WHERE true ON CONFLICT DO NOTHING")
            op.drop_table(f"{name}_unkeyed")
    insp = sa.inspect(bind)
    for index, table, cols in INDEXES:
        if index not in {i["name"] for i in insp.get_indexes(table)}:
            op.create_index(index, table, list(cols))
