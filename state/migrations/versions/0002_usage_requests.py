"""The request ids already charged to the usage ledger (state/usage.py), so each request is
counted once however often its record is retried.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "usage_requests",
        sa.Column("key_id", sa.Text(), primary_key=True),
        sa.Column("request_id", sa.Text(), primary_key=True),
        sa.Column("created", sa.Float(), nullable=False),
    )
    op.create_index("usage_requests_created", "usage_requests", ["created"])
