"""The runs this replica holds, and what every stage is given with them: a live run
(``Active``), its states and the transitions between them (``lifecycle.py``), its numbered
updates kept in memory for its watchers (``feed.py``), and ``Common`` (``live.py``): this
replica's live runs, their feeds, the store, the bus, the router and the run limits, with
the sequence blocks runs number their updates in."""
