"""Steering a live run: a message handed to a run that is going, and which steers wait
for which live run."""
