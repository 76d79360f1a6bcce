"""A message's way in: its checks (``screening.py``: fields, limits, filters, routing),
admission (storing the message and queueing its run), the content policy, and speech
around the checks, turned into text."""
