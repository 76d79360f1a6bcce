"""How the dispatcher reaches other services and its peer replicas: their contracts only,
and what it reads of a workspace's experts as the integration hub stores them."""
