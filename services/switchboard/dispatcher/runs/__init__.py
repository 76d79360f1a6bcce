"""A run's way through the dispatcher.

Admitted, scheduled, executed, published, recovered; read, watched and controlled.
"""
