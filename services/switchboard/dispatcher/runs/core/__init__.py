"""What every stage of a run shares: a live run, its lifecycle, its ordered updates and the
live runs of this replica (``active/``), its rows (``store.py``, with ``records.py`` the
values it takes and returns), the updates' publishing, the queue and its fairness, its
deadline clock, and the steers waiting for a live run."""
