"""How the dispatcher reaches other services and its peer replicas: their contracts only."""
