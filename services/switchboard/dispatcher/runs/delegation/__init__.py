"""Delegation: an assistant that asks another assistant of its workspace, as a tool.

The room: ``limits.py`` (what a child keeps of its parent, whom a delegate asks, the
bounds), ``offer.py`` (the ``ask_{id}`` tool a model is offered), ``delegation.py`` (the
process's delegation: the tools a run offers, the built-ins that run them, orphans),
``trees.py`` (each tree's count of children, claimed before a child starts),
``waiting.py`` (a parent's slot while its children run), ``delegate.py`` (one call: a
child run asked and followed to its answer) and ``handoffs.py`` (``transfer_to_{id}``).

An assistant's ``delegates`` are offered to its model as tools named
``ask_{assistant id}`` (input: the question). A call is a **child run**: the
delegate answers in a conversation of its own, started through admission like any
message (the same checks, quotas and budgets, as the parent's user), linked to its
parent (``Run.parent``, ``parent_tool_call``, ``depth``), and its final answer is the
call's result. The child is a run: it can be watched, cancelled, resumed after a
crash and charged on its own; the parent's updates name it (``child_run``) when it
starts and when it ends.

* **Bounded before it starts.** A call is refused (an error result for the parent's
  model; no conversation, no run, no model call) when the tree would grow deeper than
  ``max_depth``, when the delegate is already on the line from the tree's root to the
  parent (a cycle: A asks B asks A), or when the tree already started
  ``max_children_per_tree`` children. At most ``max_children_per_run`` children of one
  run go at once; more calls in the same step wait their turn.
* **The parent waits without a slot.** While a parent waits for its children it gives
  its scheduler slot back (as a run waiting for a person does), so parents waiting on
  children cannot fill the workspace's slots and starve the children they wait for.
* **Cancel cascades; the deadline never outlives the parent's.** A parent that ends
  while a child runs (cancelled, past its deadline) cancels the child; a process that
  stops leaves both to be resumed. A child's timeout is what is left of its parent's.
* **Durable by the journal.** A delegate call is journaled like any tool call: a child
  that answered is not asked again after a crash. One in flight is asked again with
  the same request ids, which admission and the context service answer with the
  conversation and run the first attempt made: the parent follows the same child.
"""
