"""Control: the calls that steer a run already admitted (CancelRun,
SubmitToolApprovals), on this replica or forwarded to the run's owner.

Not a stage a message passes through: a person acts on a run at any point of
its life. The run's own reactions (its task cancelled, its pause lifted) are
the execution stage's, and what they store and show is publishing's; this
module decides whether the call is acceptable and where it must go. A run
another replica owns is reached through ``ports/peers.py`` (``_owner``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.ports.peers import PeerPort, Via
from switchboard.dispatcher.runs.core.active.lifecycle import Active
from switchboard.dispatcher.runs.core.active.live import MAX_REASON_CHARS, Common
from switchboard.dispatcher.runs.core.publishing import Publishing
from switchboard.dispatcher.runs.core.records import Stored
from switchboard.dispatcher.runs.core.scheduler import Scheduler
from switchboard.dispatcher.runs.core.store import TERMINAL
from switchboard.dispatcher.runs.execution.execution import Execution
from switchboard.platform.errors import (
    DependencyUnavailable,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    RunCancelled,
    Violations,
)
from switchboard.platform.security.policy import Principal
from switchboard.platform.values import names
from switchboard.platform.values.resources import RunName

#: Decisions in one SubmitToolApprovals.
_MAX_APPROVALS: Final = 128
_DECISIONS: Final = frozenset({pb.TOOL_APPROVAL_DECISION_APPROVE, pb.TOOL_APPROVAL_DECISION_DENY})
#: What decides a call whose outcome a crash left unknown (``tools/approvals.py``).
_UNKNOWN_DECISIONS: Final = frozenset(
    {
        pb.TOOL_APPROVAL_DECISION_RETRY,
        pb.TOOL_APPROVAL_DECISION_COMPLETE,
        pb.TOOL_APPROVAL_DECISION_FAIL_RUN,
    }
)
#: A result a person gives for a call that took effect (the model reads no more of a tool's).
MAX_RESULT_TEXT_CHARS: Final = 16_000
_BUDGET_DECISIONS: Final = frozenset({pb.BUDGET_DECISION_ALLOW_OVERDRAFT, pb.BUDGET_DECISION_FAIL})
#: A call made in this process (no client credential): never forwarded.
IN_PROCESS: Final = Via()


@dataclass(frozen=True)
class _Peer:
    """The replica that owns a run, and the port that reaches it."""

    peers: PeerPort
    address: str


class Control:
    def __init__(
        self,
        *,
        common: Common,
        scheduler: Scheduler,
        execution: Execution,
        publishing: Publishing,
        peers: PeerPort | None,
    ) -> None:
        self._live = common.live
        self._store = common.store
        self._scheduler = scheduler
        self._execution = execution
        self._publishing = publishing
        self._limits = common.limits
        # The other replicas, for calls on runs they own (None: this one's runs only).
        self._peers = peers

    async def submit_tool_approvals(
        self, principal: Principal, request: pb.SubmitToolApprovalsRequest, via: Via = IN_PROCESS
    ) -> pb.Run:
        """Decide pending tool calls; ``via``: how the call came (see ``_owner``)."""
        target = RunName.parse(request.name, "name")
        _check_approvals(request)
        active = self._held(request.name)
        if active is None:
            return await self._approvals_there(target, via, request)
        waiting = {
            pending.call.id: pending
            for pending in active.run.required_action.tool_calls
            if active.run.state not in TERMINAL
        }
        if not any(
            p.decision == pb.TOOL_APPROVAL_DECISION_UNSPECIFIED for p in waiting.values()
        ) and any(a.tool_call_id not in waiting for a in request.approvals):
            # Every call decided: only a repeat of those decisions is still an
            # answer (a retry whose first attempt was applied, its reply lost).
            raise FailedPrecondition("the run is not waiting for tool approvals")
        violations = Violations()
        for index, approval in enumerate(request.approvals):
            _check_decision(index, approval, waiting.get(approval.tool_call_id), violations)
        violations.check()
        now = names.now()
        changed = False
        for approval in request.approvals:
            pending = waiting[approval.tool_call_id]
            if pending.decision == pb.TOOL_APPROVAL_DECISION_UNSPECIFIED:
                pending.decision = approval.decision
                pending.decided_by = principal.user_name
                pending.reason = approval.reason
                if approval.decision == pb.TOOL_APPROVAL_DECISION_COMPLETE:
                    pending.result_text = approval.result_text
                pending.decide_time.FromDatetime(now)
                changed = True
        if changed:
            if active.run.state == pb.RUN_STATE_REQUIRES_ACTION and not any(
                p.decision == pb.TOOL_APPROVAL_DECISION_UNSPECIFIED for p in waiting.values()
            ):
                # The last decision resumes the run in the same write, so the
                # answer says RUNNING (the runner finds it so and goes on).
                active.to(pb.RUN_STATE_RUNNING)
                if active.ticket is not None:
                    self._scheduler.resumed(active.ticket)
            # Stored and shown before the run goes on: a restart keeps the
            # decisions, and watchers see who decided what.
            if await self._publishing.persist(active, "decisions") is False:
                active.retired = True  # taken over: its owner takes the decisions
                return await self._approvals_there(target, via, request)
            runner = active.tools
            if runner is not None:
                runner.decided()
        return self._live.current(active.run)

    async def resolve_budget_action(
        self, principal: Principal, request: pb.ResolveBudgetActionRequest, via: Via = IN_PROCESS
    ) -> pb.Run:
        """Decide a run paused at a budget's cap: the step goes past it, or the run
        fails (BUDGET_EXHAUSTED). The run acts on it at once; the answer carries
        the decision."""
        target = RunName.parse(request.name, "name")
        if request.decision not in _BUDGET_DECISIONS:
            raise InvalidArgument(
                "the decision is invalid",
                [FieldViolation("decision", "must be ALLOW_OVERDRAFT or FAIL")],
            )
        active = self._held(request.name)
        if active is None:
            return await self._budget_action_there(target, via, request)
        run = active.run
        action = run.required_action
        if (
            run.state != pb.RUN_STATE_REQUIRES_ACTION
            or not action.HasField("budget")
            or active.budget is None
        ):
            raise FailedPrecondition("the run is not waiting at a budget's cap")
        budget = action.budget
        if budget.decision not in (pb.BUDGET_DECISION_UNSPECIFIED, request.decision):
            raise FailedPrecondition("the budget action was already decided the other way")
        if budget.decision == pb.BUDGET_DECISION_UNSPECIFIED:
            budget.decision = request.decision
            budget.decided_by = principal.user_name
            budget.decide_time.FromDatetime(names.now())
            # Stored and shown before the run goes on: watchers see who decided.
            if await self._publishing.persist(active, "decisions") is False:
                active.retired = True  # taken over: its owner takes the decision
                return await self._budget_action_there(target, via, request)
            active.budget.decided()
        return self._live.current(run)

    async def cancel_run(
        self,
        principal: Principal,
        name: str,
        reason: str,
        via: Via = IN_PROCESS,
        *,
        heard_through_sequence: int = 0,
    ) -> pb.Run:
        """Cancel the run; ``via``: how the call came (see ``_owner``);
        ``heard_through_sequence``: a speaking run's last speech update its listener
        heard (0: every one sent), which decides the answer it stores."""
        target = RunName.parse(name, "name")
        if len(reason) > MAX_REASON_CHARS:
            raise InvalidArgument(
                "reason is too long",
                [FieldViolation("reason", f"has more than {MAX_REASON_CHARS} characters")],
            )
        if heard_through_sequence < 0:
            raise InvalidArgument(
                "heard_through_sequence must not be negative",
                [FieldViolation("heard_through_sequence", "must not be negative")],
            )
        active = self._held(name)
        if active is not None:
            text = reason or "cancelled"
            await self._execution.cancel(
                active,
                RunCancelled(f"{text} (by {principal.user_name})"),
                heard_through=heard_through_sequence,
            )
            if not active.retired:
                return self._live.current(active.run)
            # What this process held was an attempt another instance had taken
            # over: the cancel ended only that; the run's owner ends the run.
        stored, owner = await self._owner(target, via)
        if owner is None:
            return stored.run
        # The owner holds the run's task; it answers with the ended run.
        return await owner.peers.cancel_run(
            owner.address,
            via,
            pb.CancelRunRequest(
                name=name, reason=reason, heard_through_sequence=heard_through_sequence
            ),
        )

    def _held(self, name: str) -> Active | None:
        """The run's attempt this process holds, unless another instance took the run
        over from it (a call then goes to that owner)."""
        active = self._live.runs.get(name)
        return None if active is None or active.retired else active

    async def _approvals_there(
        self, target: RunName, via: Via, request: pb.SubmitToolApprovalsRequest
    ) -> pb.Run:
        _, owner = await self._owner(target, via)
        if owner is None:
            raise FailedPrecondition("the run is not waiting for tool approvals")
        # The owner holds the pending calls; it checks the decisions and the caller.
        return await owner.peers.submit_tool_approvals(owner.address, via, request)

    async def _budget_action_there(
        self, target: RunName, via: Via, request: pb.ResolveBudgetActionRequest
    ) -> pb.Run:
        _, owner = await self._owner(target, via)
        if owner is None:
            raise FailedPrecondition("the run is not waiting at a budget's cap")
        return await owner.peers.resolve_budget_action(owner.address, via, request)

    async def owner_of(self, target: RunName, via: Via) -> tuple[Stored, _Peer | None]:
        """``_owner``, for the other calls that act on a run where it runs (SteerRun)."""
        return await self._owner(target, via)

    async def _owner(self, target: RunName, via: Via) -> tuple[Stored, _Peer | None]:
        """A run that is not active here: the stored run and, unless it has ended
        (None), the replica that owns it, to forward the call to.

        Raises UNAVAILABLE (retry) when the owner cannot be reached now: it
        stopped and its lease has not been taken over yet, it has not stored its
        address yet, or ownership moved while the call was being forwarded (a
        forwarded call is never forwarded again, so a call cannot loop).
        """
        stored, owner = await self._store.get_with_owner(
            target.workspace, target.conversation, target.run
        )
        if stored.run.state in TERMINAL:
            return stored, None
        if owner.instance == self._limits.instance_id:
            # Ours but not running: recovery (at start, or a takeover) has not
            # been able to store it again yet; the lease loop retries.
            raise _unavailable("the run is being recovered by its dispatcher replica; retry")
        if not owner.live:
            # Another replica takes it over once the lease has expired and its
            # lease loop comes round (a third of a lease).
            raise _unavailable(
                "the dispatcher replica running the run stopped; another replica takes the "
                "run over shortly; retry",
                retry_after_s=min(10.0, max(1.0, self._limits.lease_s / 3)),
            )
        if via.forwarded:
            raise _unavailable("the run moved to another dispatcher replica meanwhile; retry")
        if self._peers is None or not via.credential:
            raise FailedPrecondition("the run is active on another dispatcher replica")
        if not owner.address:
            # Starting (its address is stored before it takes calls), or a
            # version that does not store one (a rolling upgrade).
            raise _unavailable(
                "the dispatcher replica running the run has no address for other replicas "
                "yet; retry"
            )
        return stored, _Peer(self._peers, owner.address)


def _unavailable(message: str, *, retry_after_s: float = 1.0) -> DependencyUnavailable:
    error = DependencyUnavailable(message)
    error.retry_after_s = retry_after_s
    return error


def _check_decision(
    index: int,
    approval: pb.ToolApproval,
    pending: pb.PendingToolCall | None,
    violations: Violations,
) -> None:
    """Whether ``approval`` may decide ``pending`` (None: the run does not wait on it)."""
    if pending is None:
        violations.add(f"approvals[{index}].tool_call_id", "is not a call this run waits on")
    elif pending.decision not in (pb.TOOL_APPROVAL_DECISION_UNSPECIFIED, approval.decision):
        raise FailedPrecondition(
            f"the call {approval.tool_call_id} was already decided the other way"
        )
    elif pending.outcome_unknown and approval.decision not in _UNKNOWN_DECISIONS:
        raise FailedPrecondition(
            f"the outcome of call {approval.tool_call_id} is unknown: decide it with "
            "RETRY, COMPLETE or FAIL_RUN"
        )
    elif not pending.outcome_unknown and approval.decision not in _DECISIONS:
        raise FailedPrecondition(
            f"the call {approval.tool_call_id} waits for approval: decide it with APPROVE or DENY"
        )


def _check_approvals(request: pb.SubmitToolApprovalsRequest) -> None:
    violations = Violations()
    if not request.approvals:
        violations.add("approvals", "needs at least one decision")
    if len(request.approvals) > _MAX_APPROVALS:
        violations.add("approvals", f"at most {_MAX_APPROVALS} decisions")
    seen: set[str] = set()
    for index, approval in enumerate(request.approvals[:_MAX_APPROVALS]):
        where = f"approvals[{index}]"
        if not approval.tool_call_id:
            violations.add(f"{where}.tool_call_id", "is required")
        elif approval.tool_call_id in seen:
            violations.add(f"{where}.tool_call_id", "is decided twice in this request")
        seen.add(approval.tool_call_id)
        if approval.decision not in _DECISIONS | _UNKNOWN_DECISIONS:
            violations.add(
                f"{where}.decision",
                "must be APPROVE or DENY (RETRY, COMPLETE or FAIL_RUN for a call whose "
                "outcome is unknown)",
            )
        if approval.decision == pb.TOOL_APPROVAL_DECISION_COMPLETE:
            if not approval.result_text.strip():
                violations.add(f"{where}.result_text", "is required to COMPLETE a call")
            elif len(approval.result_text) > MAX_RESULT_TEXT_CHARS:
                violations.add(
                    f"{where}.result_text", f"has more than {MAX_RESULT_TEXT_CHARS} characters"
                )
        elif approval.result_text:
            violations.add(f"{where}.result_text", "is only given with COMPLETE")
        if len(approval.reason) > MAX_REASON_CHARS:
            violations.add(f"{where}.reason", f"has more than {MAX_REASON_CHARS} characters")
    violations.check()
