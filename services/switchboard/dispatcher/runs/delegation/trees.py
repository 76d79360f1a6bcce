"""Each tree's count of children: a place claimed before a child starts, so that calls of
one step that start at once cannot pass ``max_children_per_tree`` together."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from switchboard.dispatcher.runs.core.store import RunStore

#: Trees whose children this process counts (the least recently used forgotten).
MAX_TREES: Final = 10_000


class Trees:
    """The children started per tree, as far as this process knows, and the places
    claimed for children not yet stored."""

    def __init__(self, store: RunStore, limit: int) -> None:
        self._store = store
        self._limit = limit
        #: Places claimed per tree for children not yet stored (``claim``).
        self._claimed: dict[str, int] = {}
        #: Children started per tree (by its root's run id), as far as this process knows.
        self._trees: OrderedDict[str, int] = OrderedDict()

    async def claim(self, root: str, *, new: bool = False) -> Claim | None:
        """A place for one more child in the tree rooted at ``root`` (None: it is full),
        taken now; the claim is settled when the child is stored or the call gives up.
        A tree's runs are admitted by the process that runs its parents, so the count
        is kept here, read from the database once per tree (and again whenever it says
        the tree is full: a takeover may have started children elsewhere). ``new``: the
        asking run is the root, started here and not recovered, so the tree has no
        child yet (no read)."""
        limit = self._limit
        known = self._trees.get(root)
        if known is None and new:
            known = self._keep(root, 0)
        if known is None or known + self._claimed.get(root, 0) >= limit:
            # The root itself is one of the tree's runs.
            known = self._keep(root, await self._store.tree_size(root) - 1)
        self._trees.move_to_end(root)
        claimed = self._claimed.get(root, 0)
        if known + claimed >= limit:
            return None
        self._claimed[root] = claimed + 1
        return Claim(self, root)

    def _keep(self, root: str, count: int) -> int:
        self._trees[root] = count
        while len(self._trees) > MAX_TREES:
            self._trees.popitem(last=False)
        return count

    def settle(self, root: str, *, started: bool) -> None:
        """A claim on ``root``'s tree ends: its child was stored (``started``), or not."""
        left = self._claimed.get(root, 0) - 1
        if left > 0:
            self._claimed[root] = left
        else:
            self._claimed.pop(root, None)
        if started and root in self._trees:
            self._trees[root] += 1


@dataclass
class Claim:
    """One child's place in its tree (``Trees.claim``), settled once."""

    trees: Trees
    root: str
    done: bool = False

    def settle(self, *, started: bool) -> None:
        if not self.done:
            self.done = True
            self.trees.settle(self.root, started=started)
