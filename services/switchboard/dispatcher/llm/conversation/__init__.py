"""The conversation a model call sends: a run's context as Chat Completions messages
(``messages.py``), the image files in them for vision models, notes for the others
(``images.py``), and the tools offered with the messages each tool step adds
(``tools.py``)."""
