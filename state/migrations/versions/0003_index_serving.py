"""Which index version each retriever replica serves (state/serving.py).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "index_serving",
        sa.Column("replica", sa.Text(), primary_key=True),
        sa.Column("version", sa.Text()),
        sa.Column("host", sa.Text(), nullable=False, server_default=""),
        sa.Column("seen_at", sa.Float(), nullable=False),
    )
