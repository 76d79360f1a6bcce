"""A message's parts as text: ``switchboard/shared/parttext.py``, where the dispatcher's
prompt reads them too. The context's modules still naming this one move to that one
(their owners' next edit); this module goes when the last has (issue 70)."""

from switchboard.shared.parttext import render_parts, render_parts_briefly

__all__ = ["render_parts", "render_parts_briefly"]
