"""What every stage of a run shares: its lifecycle and the live runs of this replica, its
rows, its ordered updates and their publishing, the queue and its fairness, its deadline
clock, and the steers waiting for a live run."""
