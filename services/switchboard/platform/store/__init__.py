"""The store wing: the database and what every service's store shares.

The engine, the models and their one Alembic history, transactions with their
errors mapped, the outbox, and keyset page tokens.
"""
