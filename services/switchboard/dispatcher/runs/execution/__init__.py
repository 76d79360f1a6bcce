"""A run's execution: one run's life once the scheduler starts it.

The room: ``execution.py`` (the stage: the run's start, its handler's step inside its
journal, its tool runner, the answer), ``inputs.py`` (what the run reads before its
handler, on one wait), ``relay.py`` (the handler's frames into the run's updates),
``hosting.py`` (the stage as a run's tool runner and budget see it: updates, pause and
resume, messages appended), ``charges.py`` (the run's budgets), ``finishing.py`` (its
end, stored with its answer) and ``cancelling.py`` (runs ended from outside their task).
A run that speaks is wrapped by ``voice/speaking.py``, as ``durable.py`` wraps its step.
"""
