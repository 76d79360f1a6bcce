"""A message's way in: admission (validation, limits, storing the message and queueing
its run), the content policy, and speech turned into text."""
