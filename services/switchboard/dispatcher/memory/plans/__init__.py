"""The pure parts of memory forming: the model's structured answers and their checks
(``schema.py``), the plans a job carries (``plan.py``), near-duplicates (``similarity.py``).
No I/O, no grpc."""
