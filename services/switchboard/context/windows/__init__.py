"""The context window: planning what a handler gets within a token budget, building it
from one snapshot, documents cut to fit, and the window cache."""
