"""Alembic's environment: migrations run on the connection :meth:`state.db.Database.upgrade` hands
over (under its lock), never on a URL of their own."""

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite",
                  transaction_per_migration=True)
with context.begin_transaction():
    context.run_migrations()
