"""The store wing: the database and what every service's store shares.

The engine, the models and their one Alembic history, transactions with their
errors mapped, the outbox, keyset page tokens, and the keyed-resource store and
catalog step of the records a workspace keeps by id (``keyed.py``).
"""
