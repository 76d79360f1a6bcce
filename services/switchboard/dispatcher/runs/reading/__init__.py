"""Reading runs: each run's ordered updates, publishing them, the open streams (WatchRun,
Converse) and the queries (get, list, watch, describe)."""
