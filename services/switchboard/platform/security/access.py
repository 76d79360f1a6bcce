"""Every RPC's access rule, declared in this one place.

An RPC is either PUBLIC (no credential needed) or AUTHENTICATED with the scope
it needs; an RPC that names a resource also says which request field holds
that name and what it does to it, and the interceptor asks the policy before
the servicer runs. RPCs whose request names several resources (a list of event
scopes, a bidirectional stream of commands), and streams that keep their
resource authorized for as long as they relay it (WatchRun, through its
access grant), are marked ``per_item``: the servicer authorizes each one
through the same policy.

``tests/platform/security/test_access.py`` walks every method of every service
descriptor and fails if one has no rule here, if a rule names a field the
request does not have, or if a request carries a resource name the rule
ignores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from switchboard.platform.security.policy import Permission, Scope


@dataclass(frozen=True)
class Rule:
    """How one RPC is guarded."""

    public: bool = False
    # The scope needed when no resource is named (resource rules use the permission's).
    scope: Scope | None = None
    # Dotted path to the resource name in the request, e.g. "conversation.name".
    resource_field: str = ""
    permission: Permission | None = None
    # The servicer authorizes each named resource itself (streams, lists of scopes).
    per_item: bool = False
    # The workspace may be soft-deleted (restoring it); otherwise a deleted
    # workspace is NOT_FOUND like one that never existed.
    include_deleted: bool = False


PUBLIC: Final = Rule(public=True)


def authenticated(scope: Scope) -> Rule:
    return Rule(scope=scope)


def resource(field: str, permission: Permission, *, include_deleted: bool = False) -> Rule:
    return Rule(resource_field=field, permission=permission, include_deleted=include_deleted)


def per_item(scope: Scope) -> Rule:
    return Rule(scope=scope, per_item=True)


READ, SELF, WRITE, ADMIN, MANAGE = (
    Permission.READ,
    Permission.SELF,
    Permission.WRITE,
    Permission.ADMIN,
    Permission.MANAGE,
)

_AUTH = "/switchboard.api.auth.v1.AuthService/"
_CONTEXT = "/switchboard.api.context.v1.ContextService/"
_DISPATCHER = "/switchboard.api.dispatcher.v1.DispatcherService/"
_INTEGRATION = "/switchboard.api.integration.v1.IntegrationService/"
_EVENTS = "/switchboard.api.events.v1.EventService/"
_A2A = "/lf.a2a.v1.A2AService/"
_CARD = "/switchboard.api.agentcard.v1.AgentCardService/"

RULES: Final[dict[str, Rule]] = {
    # Auth: obtaining credentials is public; everything else acts on the caller's account.
    _AUTH + "Register": PUBLIC,
    _AUTH + "Login": PUBLIC,
    _AUTH + "RefreshToken": PUBLIC,  # the refresh token in the body is the credential
    _AUTH + "GetJwks": PUBLIC,
    _AUTH + "Logout": authenticated(Scope.READ),
    _AUTH + "GetPrincipal": authenticated(Scope.READ),
    _AUTH + "ListSessions": authenticated(Scope.READ),
    _AUTH + "RevokeSession": resource("name", MANAGE),
    _AUTH + "RevokeAllSessions": authenticated(Scope.MANAGE),
    _AUTH + "CreateApiKey": authenticated(Scope.MANAGE),
    _AUTH + "ListApiKeys": authenticated(Scope.READ),
    _AUTH + "RevokeApiKey": resource("name", MANAGE),
    _AUTH + "UpdateUser": resource("user.name", MANAGE),
    # The caller's own account; the domain also wants a session and the account's email.
    _AUTH + "DeleteMyAccount": authenticated(Scope.MANAGE),
    # Context.
    _CONTEXT + "CreateWorkspace": authenticated(Scope.WRITE),
    _CONTEXT + "ListWorkspaces": authenticated(Scope.READ),  # lists only the caller's
    _CONTEXT + "GetWorkspace": resource("name", READ),
    _CONTEXT + "UpdateWorkspace": resource("workspace.name", ADMIN),
    _CONTEXT + "DeleteWorkspace": resource("name", ADMIN),
    _CONTEXT + "UndeleteWorkspace": resource("name", ADMIN, include_deleted=True),
    _CONTEXT + "AddWorkspaceMember": resource("parent", ADMIN),
    _CONTEXT + "UpdateWorkspaceMember": resource("member.name", ADMIN),
    # Any member may leave; the servicer requires the owner role to remove someone else.
    _CONTEXT + "RemoveWorkspaceMember": resource("name", SELF),
    _CONTEXT + "ListWorkspaceMembers": resource("parent", READ),
    _CONTEXT + "CreateConversation": resource("parent", WRITE),
    _CONTEXT + "GetConversation": resource("name", READ),
    _CONTEXT + "ListConversations": resource("parent", READ),
    _CONTEXT + "UpdateConversation": resource("conversation.name", WRITE),
    _CONTEXT + "DeleteConversation": resource("name", WRITE),
    _CONTEXT + "UndeleteConversation": resource("name", WRITE),
    _CONTEXT + "AppendMessage": resource("parent", WRITE),
    _CONTEXT + "GetMessage": resource("name", READ),
    _CONTEXT + "ListMessages": resource("parent", READ),
    # Another person's message needs the owner role too (the domain checks it).
    _CONTEXT + "DeleteMessage": resource("name", WRITE),
    _CONTEXT + "CreateBranch": resource("conversation", WRITE),
    # A new conversation of the message's workspace: an editor's, as CreateConversation.
    _CONTEXT + "ForkConversation": resource("message", WRITE),
    _CONTEXT + "SwitchBranch": resource("conversation", WRITE),
    _CONTEXT + "CreateMemoryItem": resource("parent", WRITE),
    _CONTEXT + "GetMemoryItem": resource("name", READ),
    _CONTEXT + "UpdateMemoryItem": resource("memory_item.name", WRITE),
    _CONTEXT + "ListMemoryItems": resource("parent", READ),
    _CONTEXT + "SearchMemoryItems": resource("parent", READ),
    _CONTEXT + "SearchContext": resource("parent", READ),
    _CONTEXT + "GetSemanticIndex": resource("name", READ),
    _CONTEXT + "UpdateSemanticIndex": resource("semantic_index.name", ADMIN),
    _CONTEXT + "DeleteMemoryItem": resource("name", WRITE),
    _CONTEXT + "GetContextWindow": resource("conversation", READ),
    _CONTEXT + "PruneConversation": resource("conversation", WRITE),
    # Files follow the workspace's roles: viewers read and download, editors write.
    # UploadFile names its workspace in the stream's first frame: the domain
    # authorizes it with the same policy.
    _CONTEXT + "UploadFile": per_item(Scope.WRITE),
    _CONTEXT + "StartUpload": resource("parent", WRITE),
    _CONTEXT + "AppendUpload": resource("name", WRITE),
    _CONTEXT + "GetUpload": resource("name", WRITE),
    _CONTEXT + "FinishUpload": resource("name", WRITE),
    _CONTEXT + "CancelUpload": resource("name", WRITE),
    _CONTEXT + "GetFile": resource("name", READ),
    _CONTEXT + "ListFiles": resource("parent", READ),
    _CONTEXT + "DownloadFile": resource("name", READ),
    # An export reads what the caller may read; the archive is theirs alone (users/{u}/…).
    _CONTEXT + "ExportMyData": authenticated(Scope.READ),
    _CONTEXT + "GetDataExport": resource("name", READ),
    _CONTEXT + "DeleteFile": resource("name", WRITE),
    # Dispatcher.
    _DISPATCHER + "SendMessage": resource("conversation", WRITE),
    _DISPATCHER + "RegenerateMessage": resource("message", WRITE),
    _DISPATCHER + "GetRun": resource("name", READ),
    _DISPATCHER + "ListRuns": resource("parent", READ),
    _DISPATCHER + "CancelRun": resource("name", WRITE),
    # Steering a run is sending a message into its conversation: an editor's.
    _DISPATCHER + "SteerRun": resource("run", WRITE),
    # Authorized by the servicer's stream grant (platform/security/accesswatch.py), which
    # must hold the run for as long as it relays it: checking it here as well
    # would read the membership twice per stream.
    _DISPATCHER + "WatchRun": per_item(Scope.READ),
    _DISPATCHER + "Converse": per_item(Scope.READ),
    # A voice session holds its conversation for WRITE through the stream's grant,
    # checked when it starts or resumes (the session's own creator only).
    _DISPATCHER + "Talk": per_item(Scope.WRITE),
    # ConnectTalk opens the same session (start or resume, named in the request's oneof):
    # the session's own checks authorize it before any peer is made.
    _DISPATCHER + "ConnectTalk": per_item(Scope.WRITE),
    # The servers a page gathers with before ConnectTalk; a TURN credential is minted for
    # the caller, so only a credential that may talk gets one.
    _DISPATCHER + "GetIceServers": authenticated(Scope.WRITE),
    _DISPATCHER + "ListHandlers": resource("parent", READ),
    # Deciding what a run may do is an editor's, like sending it; viewers watch.
    _DISPATCHER + "SubmitToolApprovals": resource("name", WRITE),
    # Spending past a cap is an owner's decision, like the cap itself.
    _DISPATCHER + "ResolveBudgetAction": resource("name", ADMIN),
    # Assistants: members use them, owners define them.
    _DISPATCHER + "CreateAssistant": resource("parent", ADMIN),
    _DISPATCHER + "GetAssistant": resource("name", READ),
    _DISPATCHER + "ListAssistants": resource("parent", READ),
    _DISPATCHER + "UpdateAssistant": resource("assistant.name", ADMIN),
    _DISPATCHER + "DeleteAssistant": resource("name", ADMIN),
    _DISPATCHER + "ListAssistantRevisions": resource("parent", READ),
    _DISPATCHER + "RollbackAssistant": resource("name", ADMIN),
    _DISPATCHER + "DescribeConversation": resource("conversation", READ),
    # Budgets: owners set the caps, members see them and what was spent.
    _DISPATCHER + "CreateBudget": resource("parent", ADMIN),
    _DISPATCHER + "GetBudget": resource("name", READ),
    _DISPATCHER + "ListBudgets": resource("parent", READ),
    _DISPATCHER + "UpdateBudget": resource("budget.name", ADMIN),
    _DISPATCHER + "DeleteBudget": resource("name", ADMIN),
    _DISPATCHER + "QueryUsage": resource("parent", READ),
    # Quotas: members see what bounds them, owners set it.
    _DISPATCHER + "GetWorkspaceQuota": resource("name", READ),
    _DISPATCHER + "UpdateWorkspaceQuota": resource("quota.name", ADMIN),
    # Schedules: as assistants, members read them, owners define them (their runs act as
    # their creator, who must still be able to write when a tick fires).
    _DISPATCHER + "CreateSchedule": resource("parent", ADMIN),
    _DISPATCHER + "GetSchedule": resource("name", READ),
    _DISPATCHER + "ListSchedules": resource("parent", READ),
    _DISPATCHER + "UpdateSchedule": resource("schedule.name", ADMIN),
    _DISPATCHER + "PauseSchedule": resource("name", ADMIN),
    _DISPATCHER + "ResumeSchedule": resource("name", ADMIN),
    _DISPATCHER + "DeleteSchedule": resource("name", ADMIN),
    _DISPATCHER + "ListScheduleFirings": resource("parent", READ),
    # Phone calls: a member who may write places a call (through a trunk that allows the
    # workspace and the number) and ends one; members see them.
    _DISPATCHER + "PlaceCall": resource("parent", WRITE),
    _DISPATCHER + "GetCall": resource("name", READ),
    _DISPATCHER + "ListCalls": resource("parent", READ),
    _DISPATCHER + "EndCall": resource("name", WRITE),
    # Integration: registering external services is an owner's decision.
    _INTEGRATION + "CreateIntegration": resource("parent", ADMIN),
    _INTEGRATION + "GetIntegration": resource("name", READ),
    _INTEGRATION + "ListIntegrations": resource("parent", READ),
    _INTEGRATION + "UpdateIntegration": resource("integration.name", ADMIN),
    _INTEGRATION + "DeleteIntegration": resource("name", ADMIN),
    # Authorized by the servicer's stream grant, which keeps the workspace held.
    _INTEGRATION + "WatchIntegrations": per_item(Scope.READ),
    _INTEGRATION + "ListTools": resource("parent", READ),
    _INTEGRATION + "InvokeTool": resource("name", WRITE),
    _INTEGRATION + "ListWebhookDeliveries": resource("parent", READ),
    _INTEGRATION + "RedeliverWebhook": resource("name", ADMIN),
    # Events: a subscription names several scopes; each is authorized by the servicer.
    _EVENTS + "Subscribe": per_item(Scope.READ),
    _EVENTS + "Stream": per_item(Scope.READ),
    _EVENTS + "ListEvents": per_item(Scope.READ),
    # A2A: its names (tenant, task and context ids) map to Switchboard names
    # (a2a/mapping.py); the servicer authorizes each through the policy with the
    # permission the matching Switchboard RPC needs (docs/a2a.md).
    _A2A + "SendMessage": per_item(Scope.WRITE),
    _A2A + "SendStreamingMessage": per_item(Scope.WRITE),
    _A2A + "GetTask": per_item(Scope.READ),
    _A2A + "ListTasks": per_item(Scope.READ),
    _A2A + "CancelTask": per_item(Scope.WRITE),
    _A2A + "SubscribeToTask": per_item(Scope.READ),
    _A2A + "GetExtendedAgentCard": per_item(Scope.READ),
    _A2A + "CreateTaskPushNotificationConfig": per_item(Scope.WRITE),
    _A2A + "GetTaskPushNotificationConfig": per_item(Scope.READ),
    _A2A + "ListTaskPushNotificationConfigs": per_item(Scope.READ),
    _A2A + "DeleteTaskPushNotificationConfig": per_item(Scope.WRITE),
    # The public Agent Card: the same for every tenant, naming nothing that exists
    # (a2a/card/public.py); the extended card above is the authorized one.
    _CARD + "GetPublicAgentCard": PUBLIC,
}

# Infrastructure every orchestrator and operator must reach without credentials.
PUBLIC_PREFIXES: Final = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def rule_for(method: str) -> Rule | None:
    """The rule of a full method name; None for methods nobody declared (refused)."""
    rule = RULES.get(method)
    if rule is None and method.startswith(PUBLIC_PREFIXES):
        return PUBLIC
    return rule
