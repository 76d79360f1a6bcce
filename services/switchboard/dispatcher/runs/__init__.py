"""A run's way through the dispatcher.

Admitted, scheduled, executed (``execution/``: the handler's step inside its journal), published,
recovered; read, watched, steered and controlled. What every stage shares is ``core/``.
"""
