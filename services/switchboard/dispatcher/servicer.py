"""Transport for DispatcherService: converts proto to domain calls and nothing else.

Its two open streams, WatchRun and Converse, are the dispatcher's
(``runs/reading/streams.py``): it hands them the caller, the request frames and how the
call reached this replica, and writes out the frames they give back.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from grpc import aio

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.dispatcher.v1 import dispatcher_pb2_grpc
from switchboard.dispatcher.handlers.handed import HEADER, Handed, parse_header
from switchboard.dispatcher.ports.peers import FORWARDED_KEY, Via
from switchboard.dispatcher.service import Dispatcher
from switchboard.platform.security.authn import bearer_credential, current_principal

SERVICE = pb.DESCRIPTOR.services_by_name["DispatcherService"]

Context = aio.ServicerContext[object, object]


def _via(context: Context, *, deadline: bool = True) -> Via:
    """How a call reached this replica, for one the owner of a run must answer.

    The credential is the caller's, already authenticated here (the owner checks
    it again); the forwarded mark only stops this call from being forwarded on.
    """
    metadata = context.invocation_metadata() or ()
    remaining = context.time_remaining() if deadline else None
    return Via(
        credential=bearer_credential(metadata) or "",
        forwarded=any(key == FORWARDED_KEY for key, _ in metadata),
        timeout_s=remaining,
    )


def _handed(context: Context) -> Handed | None:
    """The budget a caller handed over (``x-switchboard-budget``), if it sent one."""
    for key, value in context.invocation_metadata() or ():
        if key == HEADER:
            return parse_header(value if isinstance(value, str) else value.decode("latin-1"))
    return None


class DispatcherServiceServicer(dispatcher_pb2_grpc.DispatcherServiceServicer):
    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher

    async def SendMessage(
        self, request: pb.SendMessageRequest, context: Context
    ) -> pb.SendMessageResponse:
        return await self._dispatcher.send_message(
            current_principal(), request, _handed(context), via=_via(context)
        )

    async def RegenerateMessage(
        self, request: pb.RegenerateMessageRequest, context: Context
    ) -> pb.RegenerateMessageResponse:
        return await self._dispatcher.regenerate(current_principal(), request)

    async def SteerRun(self, request: pb.SteerRunRequest, context: Context) -> pb.SteerRunResponse:
        return await self._dispatcher.steer_run(
            current_principal(), request, _via(context), handed=_handed(context)
        )

    async def GetRun(self, request: pb.GetRunRequest, context: Context) -> pb.GetRunResponse:
        return pb.GetRunResponse(run=await self._dispatcher.get_run(request.name, children=True))

    async def ListRuns(self, request: pb.ListRunsRequest, context: Context) -> pb.ListRunsResponse:
        return await self._dispatcher.list_runs(request)

    async def CancelRun(
        self, request: pb.CancelRunRequest, context: Context
    ) -> pb.CancelRunResponse:
        run = await self._dispatcher.cancel_run(
            current_principal(),
            request.name,
            request.reason,
            _via(context),
            heard_through_sequence=request.heard_through_sequence,
        )
        return pb.CancelRunResponse(run=run)

    async def WatchRun(
        self, request: pb.WatchRunRequest, context: Context
    ) -> AsyncIterator[pb.WatchRunResponse]:
        # Closed with this call, not left to the collector: its grant closes now,
        # and what its end raises is this call's.
        frames = self._dispatcher.watch_run(
            current_principal(), request.name, request.after_sequence, merge=request.merge_deltas
        )
        async with contextlib.aclosing(frames):
            async for frame in frames:
                yield frame

    async def ListHandlers(
        self, request: pb.ListHandlersRequest, context: Context
    ) -> pb.ListHandlersResponse:
        return await self._dispatcher.list_handlers(request)

    async def SubmitToolApprovals(
        self, request: pb.SubmitToolApprovalsRequest, context: Context
    ) -> pb.SubmitToolApprovalsResponse:
        run = await self._dispatcher.submit_tool_approvals(
            current_principal(), request, _via(context)
        )
        return pb.SubmitToolApprovalsResponse(run=run)

    async def ResolveBudgetAction(
        self, request: pb.ResolveBudgetActionRequest, context: Context
    ) -> pb.ResolveBudgetActionResponse:
        run = await self._dispatcher.resolve_budget_action(
            current_principal(), request, _via(context)
        )
        return pb.ResolveBudgetActionResponse(run=run)

    async def CreateAssistant(
        self, request: pb.CreateAssistantRequest, context: Context
    ) -> pb.CreateAssistantResponse:
        assistant = await self._dispatcher.assistants.create(current_principal(), request)
        return pb.CreateAssistantResponse(assistant=assistant)

    async def GetAssistant(
        self, request: pb.GetAssistantRequest, context: Context
    ) -> pb.GetAssistantResponse:
        return pb.GetAssistantResponse(
            assistant=await self._dispatcher.assistants.get(request.name, request.revision)
        )

    async def ListAssistantRevisions(
        self, request: pb.ListAssistantRevisionsRequest, context: Context
    ) -> pb.ListAssistantRevisionsResponse:
        return await self._dispatcher.assistants.list_revisions(request)

    async def RollbackAssistant(
        self, request: pb.RollbackAssistantRequest, context: Context
    ) -> pb.RollbackAssistantResponse:
        assistant = await self._dispatcher.assistants.rollback(current_principal(), request)
        return pb.RollbackAssistantResponse(assistant=assistant)

    async def ListAssistants(
        self, request: pb.ListAssistantsRequest, context: Context
    ) -> pb.ListAssistantsResponse:
        return await self._dispatcher.assistants.list_assistants(request)

    async def UpdateAssistant(
        self, request: pb.UpdateAssistantRequest, context: Context
    ) -> pb.UpdateAssistantResponse:
        assistant = await self._dispatcher.assistants.update(current_principal(), request)
        return pb.UpdateAssistantResponse(assistant=assistant)

    async def DeleteAssistant(
        self, request: pb.DeleteAssistantRequest, context: Context
    ) -> pb.DeleteAssistantResponse:
        await self._dispatcher.assistants.delete(current_principal(), request.name, request.etag)
        return pb.DeleteAssistantResponse()

    async def CreateBudget(
        self, request: pb.CreateBudgetRequest, context: Context
    ) -> pb.CreateBudgetResponse:
        budget = await self._dispatcher.budgets.create(current_principal(), request)
        return pb.CreateBudgetResponse(budget=budget)

    async def GetBudget(
        self, request: pb.GetBudgetRequest, context: Context
    ) -> pb.GetBudgetResponse:
        return pb.GetBudgetResponse(budget=await self._dispatcher.budgets.get(request.name))

    async def ListBudgets(
        self, request: pb.ListBudgetsRequest, context: Context
    ) -> pb.ListBudgetsResponse:
        return await self._dispatcher.budgets.list_budgets(request)

    async def UpdateBudget(
        self, request: pb.UpdateBudgetRequest, context: Context
    ) -> pb.UpdateBudgetResponse:
        budget = await self._dispatcher.budgets.update(current_principal(), request)
        return pb.UpdateBudgetResponse(budget=budget)

    async def DeleteBudget(
        self, request: pb.DeleteBudgetRequest, context: Context
    ) -> pb.DeleteBudgetResponse:
        await self._dispatcher.budgets.delete(current_principal(), request.name, request.etag)
        return pb.DeleteBudgetResponse()

    async def QueryUsage(
        self, request: pb.QueryUsageRequest, context: Context
    ) -> pb.QueryUsageResponse:
        return await self._dispatcher.usage.query(request)

    async def GetWorkspaceQuota(
        self, request: pb.GetWorkspaceQuotaRequest, context: Context
    ) -> pb.GetWorkspaceQuotaResponse:
        return pb.GetWorkspaceQuotaResponse(quota=await self._dispatcher.quotas.get(request.name))

    async def UpdateWorkspaceQuota(
        self, request: pb.UpdateWorkspaceQuotaRequest, context: Context
    ) -> pb.UpdateWorkspaceQuotaResponse:
        quota = await self._dispatcher.quotas.update(current_principal(), request)
        return pb.UpdateWorkspaceQuotaResponse(quota=quota)

    async def DescribeConversation(
        self, request: pb.DescribeConversationRequest, context: Context
    ) -> pb.DescribeConversationResponse:
        return await self._dispatcher.describe_conversation(current_principal(), request)

    async def Converse(
        self, request_iterator: AsyncIterator[pb.ConverseRequest], context: Context
    ) -> AsyncIterator[pb.ConverseResponse]:
        # The stream's deadline is not an action's: each forwarded action gets its own.
        via = _via(context, deadline=False)
        frames = self._dispatcher.converse(current_principal(), request_iterator, via)
        async with contextlib.aclosing(frames):
            async for frame in frames:
                yield frame

    async def Talk(
        self, request_iterator: AsyncIterator[pb.TalkRequest], context: Context
    ) -> AsyncIterator[pb.TalkResponse]:
        # Like Converse: the stream's deadline is not an interrupt's.
        via = _via(context, deadline=False)
        frames = self._dispatcher.talk(current_principal(), request_iterator, via)
        async with contextlib.aclosing(frames):
            async for frame in frames:
                yield frame

    async def ConnectTalk(
        self, request: pb.ConnectTalkRequest, context: Context
    ) -> pb.ConnectTalkResponse:
        # The session outlives this call: the call's deadline is the answer's only.
        via = _via(context, deadline=False)
        return await self._dispatcher.connect_talk(current_principal(), request, via)

    async def GetIceServers(
        self, request: pb.GetIceServersRequest, context: Context
    ) -> pb.GetIceServersResponse:
        return self._dispatcher.get_ice_servers(current_principal())

    async def CreateSchedule(
        self, request: pb.CreateScheduleRequest, context: Context
    ) -> pb.CreateScheduleResponse:
        schedule = await self._dispatcher.schedules.create(current_principal(), request)
        return pb.CreateScheduleResponse(schedule=schedule)

    async def GetSchedule(
        self, request: pb.GetScheduleRequest, context: Context
    ) -> pb.GetScheduleResponse:
        return pb.GetScheduleResponse(schedule=await self._dispatcher.schedules.get(request.name))

    async def ListSchedules(
        self, request: pb.ListSchedulesRequest, context: Context
    ) -> pb.ListSchedulesResponse:
        return await self._dispatcher.schedules.list_schedules(request)

    async def UpdateSchedule(
        self, request: pb.UpdateScheduleRequest, context: Context
    ) -> pb.UpdateScheduleResponse:
        schedule = await self._dispatcher.schedules.update(current_principal(), request)
        return pb.UpdateScheduleResponse(schedule=schedule)

    async def PauseSchedule(
        self, request: pb.PauseScheduleRequest, context: Context
    ) -> pb.PauseScheduleResponse:
        schedule = await self._dispatcher.schedules.pause(current_principal(), request)
        return pb.PauseScheduleResponse(schedule=schedule)

    async def ResumeSchedule(
        self, request: pb.ResumeScheduleRequest, context: Context
    ) -> pb.ResumeScheduleResponse:
        schedule = await self._dispatcher.schedules.resume(current_principal(), request)
        return pb.ResumeScheduleResponse(schedule=schedule)

    async def DeleteSchedule(
        self, request: pb.DeleteScheduleRequest, context: Context
    ) -> pb.DeleteScheduleResponse:
        await self._dispatcher.schedules.delete(current_principal(), request.name, request.etag)
        return pb.DeleteScheduleResponse()

    async def ListScheduleFirings(
        self, request: pb.ListScheduleFiringsRequest, context: Context
    ) -> pb.ListScheduleFiringsResponse:
        return await self._dispatcher.schedules.list_firings(request)

    async def PlaceCall(
        self, request: pb.PlaceCallRequest, context: Context
    ) -> pb.PlaceCallResponse:
        call = await self._dispatcher.calls.place(current_principal().user_id, request)
        return pb.PlaceCallResponse(call=call)

    async def GetCall(self, request: pb.GetCallRequest, context: Context) -> pb.GetCallResponse:
        return pb.GetCallResponse(call=await self._dispatcher.calls.get(request.name))

    async def ListCalls(
        self, request: pb.ListCallsRequest, context: Context
    ) -> pb.ListCallsResponse:
        return await self._dispatcher.calls.list(request)

    async def EndCall(self, request: pb.EndCallRequest, context: Context) -> pb.EndCallResponse:
        principal = current_principal()
        call = await self._dispatcher.calls.end(principal.user_name, request.name, _via(context))
        return pb.EndCallResponse(call=call)
