"""The events wing: the one publisher, the log behind it, who may serve it, and who follows it.

The bus and its fan-out, the event log (embedded table or Redis Stream), its
spans, the lock that decides which processes serve events on a database, and the
leased feeder that follows the log from a stored cursor for one consumer at a time
(``feeder.py``, ``feedstore.py``: the webhook engine, the semantic indexer).
"""
