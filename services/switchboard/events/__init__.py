"""The EventService: the replayable event log and subscriptions."""
