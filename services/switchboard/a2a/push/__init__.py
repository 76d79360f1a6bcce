"""A2A push notifications: per-task webhooks of a served A2A task, in one home.

Serving A2A (the front door) is where a config comes from and what it means,
so every part of the feature is here:

* ``configs.py``: the four push-config methods and a send's
  ``task_push_notification_config``: validated, authorized as the task,
  sealed and stored, the task's status so far recorded first;
* ``store.py``: the ``push_configs`` table (and a new config's earlier
  deliveries), written wherever the front door runs: every process has the
  database;
* ``delivery.py``: what is sent for a config (A2A's ``StreamResponse``, its
  token, its signature or Authorization header) and how long a config lives.

The sending itself is the integration service's webhook engine
(``integration/webhooks/delivery.py``): the same feeder, sender, ordering, retries,
breaker, egress checks and disabling as a webhook integration's. A service may
not import the front door, so the engine reaches ``delivery.py`` through
``shared.PushNotifications``, which the composition root plugs in
(``mesh.connect``).
"""
