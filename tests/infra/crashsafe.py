"""A parallel run that survives a worker's crash: it ends, and says which test crashed.

``make pytest`` hands whole files to xdist workers (``--dist loadfile``). When a worker dies
(a native library's segfault, an out-of-memory kill), xdist 3.8's file scheduler puts back
on its queue *everything* that worker was ever given, the files it had finished included.
A finished file goes to the next worker as an empty batch, a worker given an empty batch
never reports a test done, and a worker is only given more when it reports one: the run
stops moving with every worker idle, and CI sees nothing until its time limit (upstream:
pytest-xdist issues 784, 1327 and 1378; 1371 for the retry). This scheduler puts back only what
the dead worker had not run, minus the test it died in (already reported as failed: run again,
it would take the next worker down with it), never hands out an empty batch, and keeps
every worker either two tests ahead or told of the end.
"""

from __future__ import annotations

from typing import Any

import pytest
from xdist.scheduler import LoadFileScheduling
from xdist.workermanage import WorkerController


class CrashSafeFileScheduling(LoadFileScheduling):
    def remove_node(self, node: WorkerController) -> str | None:
        workload = self.assigned_work[node]
        crashed: str | None = next(
            (test for unit in workload.values() for test, done in unit.items() if not done), None
        )
        if crashed is not None:
            workload[self._split_scope(crashed)][crashed] = True
            for scope in [scope for scope, unit in workload.items() if all(unit.values())]:
                del workload[scope]
        found = super().remove_node(node)
        return crashed if crashed is not None else found

    def _reschedule(self, node: WorkerController) -> None:
        # A worker holds back its batch's last test until it hears of a next one or of the
        # end, and it only hears when it reports a test done. xdist's first schedule gives
        # each worker two files for that; a replacement got one, and with a single test
        # pending it waited for ever: it gets a second, or the end.
        super()._reschedule(node)
        if not node.shutting_down and self._pending_of(self.assigned_work[node]) < 2:
            super()._reschedule(node)

    def _assign_work_unit(self, node: WorkerController) -> None:
        while self.workqueue and all(next(iter(self.workqueue.values())).values()):
            self.workqueue.popitem(last=False)
        if self.workqueue:
            super()._assign_work_unit(node)
        # Nothing left to give: the end, now (see ``_reschedule``).
        if not self.workqueue and not node.shutting_down:
            node.shutdown()


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> LoadFileScheduling | None:
    if config.getvalue("dist") != "loadfile":
        return None
    return CrashSafeFileScheduling(config, log)
