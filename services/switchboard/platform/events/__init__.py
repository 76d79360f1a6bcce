"""The events wing: the one publisher, the log behind it, and who may serve it.

The bus and its fan-out, the event log (embedded table or Redis Stream), its
spans, and the lock that decides which processes serve events on a database.
"""
