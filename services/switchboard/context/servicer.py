"""Transport for ContextService: hands each request to the domain, wraps the result.

The guard has authorized the resource each request names before a method
here runs (``platform/security/access.py``); ``role_var`` holds the caller's role it found.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from grpc import aio

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.context.domain import ContextDomain
from switchboard.platform.security.authn import current_principal, role_var

SERVICE = pb.DESCRIPTOR.services_by_name["ContextService"]

Context = aio.ServicerContext[Any, Any]


class ContextServiceServicer:
    """ContextService transport."""

    def __init__(self, domain: ContextDomain) -> None:
        self._domain = domain

    # Workspaces.

    async def CreateWorkspace(
        self, request: pb.CreateWorkspaceRequest, context: Context
    ) -> pb.CreateWorkspaceResponse:
        workspace = await self._domain.workspaces.create(current_principal(), request)
        return pb.CreateWorkspaceResponse(workspace=workspace)

    async def GetWorkspace(
        self, request: pb.GetWorkspaceRequest, context: Context
    ) -> pb.GetWorkspaceResponse:
        workspace = await self._domain.workspaces.get(role_var.get(), request.name)
        return pb.GetWorkspaceResponse(workspace=workspace)

    async def ListWorkspaces(
        self, request: pb.ListWorkspacesRequest, context: Context
    ) -> pb.ListWorkspacesResponse:
        return await self._domain.workspaces.list(current_principal(), request)

    async def UpdateWorkspace(
        self, request: pb.UpdateWorkspaceRequest, context: Context
    ) -> pb.UpdateWorkspaceResponse:
        workspace = await self._domain.workspaces.update(current_principal(), request)
        return pb.UpdateWorkspaceResponse(workspace=workspace)

    async def DeleteWorkspace(
        self, request: pb.DeleteWorkspaceRequest, context: Context
    ) -> pb.DeleteWorkspaceResponse:
        workspace = await self._domain.workspaces.set_deleted(
            current_principal(), request.name, request.etag, deleted=True
        )
        return pb.DeleteWorkspaceResponse(workspace=workspace)

    async def UndeleteWorkspace(
        self, request: pb.UndeleteWorkspaceRequest, context: Context
    ) -> pb.UndeleteWorkspaceResponse:
        workspace = await self._domain.workspaces.set_deleted(
            current_principal(), request.name, request.etag, deleted=False
        )
        return pb.UndeleteWorkspaceResponse(workspace=workspace)

    # Members.

    async def AddWorkspaceMember(
        self, request: pb.AddWorkspaceMemberRequest, context: Context
    ) -> pb.AddWorkspaceMemberResponse:
        member = await self._domain.members.add(current_principal(), request)
        return pb.AddWorkspaceMemberResponse(member=member)

    async def UpdateWorkspaceMember(
        self, request: pb.UpdateWorkspaceMemberRequest, context: Context
    ) -> pb.UpdateWorkspaceMemberResponse:
        member = await self._domain.members.update(current_principal(), request)
        return pb.UpdateWorkspaceMemberResponse(member=member)

    async def RemoveWorkspaceMember(
        self, request: pb.RemoveWorkspaceMemberRequest, context: Context
    ) -> pb.RemoveWorkspaceMemberResponse:
        await self._domain.members.remove(
            current_principal(), role_var.get(), request.name, erase=request.erase
        )
        return pb.RemoveWorkspaceMemberResponse()

    async def ListWorkspaceMembers(
        self, request: pb.ListWorkspaceMembersRequest, context: Context
    ) -> pb.ListWorkspaceMembersResponse:
        return await self._domain.members.list(request)

    # Conversations.

    async def CreateConversation(
        self, request: pb.CreateConversationRequest, context: Context
    ) -> pb.CreateConversationResponse:
        conversation = await self._domain.conversations.create(current_principal(), request)
        return pb.CreateConversationResponse(conversation=conversation)

    async def GetConversation(
        self, request: pb.GetConversationRequest, context: Context
    ) -> pb.GetConversationResponse:
        conversation = await self._domain.conversations.get(request.name)
        return pb.GetConversationResponse(conversation=conversation)

    async def ListConversations(
        self, request: pb.ListConversationsRequest, context: Context
    ) -> pb.ListConversationsResponse:
        return await self._domain.conversations.list(request)

    async def UpdateConversation(
        self, request: pb.UpdateConversationRequest, context: Context
    ) -> pb.UpdateConversationResponse:
        conversation = await self._domain.conversations.update(current_principal(), request)
        return pb.UpdateConversationResponse(conversation=conversation)

    async def DeleteConversation(
        self, request: pb.DeleteConversationRequest, context: Context
    ) -> pb.DeleteConversationResponse:
        conversation = await self._domain.conversations.set_deleted(
            current_principal(), request.name, request.etag, deleted=True
        )
        return pb.DeleteConversationResponse(conversation=conversation)

    async def UndeleteConversation(
        self, request: pb.UndeleteConversationRequest, context: Context
    ) -> pb.UndeleteConversationResponse:
        conversation = await self._domain.conversations.set_deleted(
            current_principal(), request.name, request.etag, deleted=False
        )
        return pb.UndeleteConversationResponse(conversation=conversation)

    # Messages.

    async def ForkConversation(
        self, request: pb.ForkConversationRequest, context: Context
    ) -> pb.ForkConversationResponse:
        conversation = await self._domain.conversations.fork(current_principal(), request)
        return pb.ForkConversationResponse(conversation=conversation)

    async def AppendMessage(
        self, request: pb.AppendMessageRequest, context: Context
    ) -> pb.AppendMessageResponse:
        message = await self._domain.messages.append(current_principal(), request)
        return pb.AppendMessageResponse(message=message)

    async def GetMessage(
        self, request: pb.GetMessageRequest, context: Context
    ) -> pb.GetMessageResponse:
        return pb.GetMessageResponse(message=await self._domain.messages.get(request.name))

    async def ListMessages(
        self, request: pb.ListMessagesRequest, context: Context
    ) -> pb.ListMessagesResponse:
        return await self._domain.messages.list(request)

    async def DeleteMessage(
        self, request: pb.DeleteMessageRequest, context: Context
    ) -> pb.DeleteMessageResponse:
        return await self._domain.messages.delete(current_principal(), role_var.get(), request)

    # Branches.

    async def CreateBranch(
        self, request: pb.CreateBranchRequest, context: Context
    ) -> pb.CreateBranchResponse:
        return await self._domain.branches.create(current_principal(), request)

    async def SwitchBranch(
        self, request: pb.SwitchBranchRequest, context: Context
    ) -> pb.SwitchBranchResponse:
        conversation = await self._domain.branches.switch(current_principal(), request)
        return pb.SwitchBranchResponse(conversation=conversation)

    # Memory.

    async def CreateMemoryItem(
        self, request: pb.CreateMemoryItemRequest, context: Context
    ) -> pb.CreateMemoryItemResponse:
        item = await self._domain.memory.create(current_principal(), request)
        return pb.CreateMemoryItemResponse(memory_item=item)

    async def GetMemoryItem(
        self, request: pb.GetMemoryItemRequest, context: Context
    ) -> pb.GetMemoryItemResponse:
        return await self._domain.memory.read(request)

    async def UpdateMemoryItem(
        self, request: pb.UpdateMemoryItemRequest, context: Context
    ) -> pb.UpdateMemoryItemResponse:
        item = await self._domain.memory.update(current_principal(), request)
        return pb.UpdateMemoryItemResponse(memory_item=item)

    async def ListMemoryItems(
        self, request: pb.ListMemoryItemsRequest, context: Context
    ) -> pb.ListMemoryItemsResponse:
        return await self._domain.memory.list(request)

    async def SearchMemoryItems(
        self, request: pb.SearchMemoryItemsRequest, context: Context
    ) -> pb.SearchMemoryItemsResponse:
        return await self._domain.memory.search(request)

    async def SearchContext(
        self, request: pb.SearchContextRequest, context: Context
    ) -> pb.SearchContextResponse:
        return await self._domain.search.search_context(request)

    async def GetSemanticIndex(
        self, request: pb.GetSemanticIndexRequest, context: Context
    ) -> pb.GetSemanticIndexResponse:
        return pb.GetSemanticIndexResponse(
            semantic_index=await self._domain.semantic.get(request.name)
        )

    async def UpdateSemanticIndex(
        self, request: pb.UpdateSemanticIndexRequest, context: Context
    ) -> pb.UpdateSemanticIndexResponse:
        index = await self._domain.semantic.update(current_principal(), request)
        return pb.UpdateSemanticIndexResponse(semantic_index=index)

    async def DeleteMemoryItem(
        self, request: pb.DeleteMemoryItemRequest, context: Context
    ) -> pb.DeleteMemoryItemResponse:
        await self._domain.memory.delete(current_principal(), request.name)
        return pb.DeleteMemoryItemResponse()

    # The context window.

    async def GetContextWindow(
        self, request: pb.GetContextWindowRequest, context: Context
    ) -> bytes:
        # Already serialized: a cached window is served as the bytes it was stored as.
        return await self._domain.windows.window(current_principal(), request)

    async def PruneConversation(
        self, request: pb.PruneConversationRequest, context: Context
    ) -> pb.PruneConversationResponse:
        return await self._domain.pruning.prune(current_principal(), request)

    # Files.

    async def UploadFile(
        self, request_iterator: AsyncIterator[pb.UploadFileRequest], context: Context
    ) -> pb.UploadFileResponse:
        # The parent is in the first frame: the domain authorizes it (a per-item rule).
        file = await self._domain.files.upload_stream(current_principal(), request_iterator)
        return pb.UploadFileResponse(file=file)

    async def StartUpload(
        self, request: pb.StartUploadRequest, context: Context
    ) -> pb.StartUploadResponse:
        upload = await self._domain.files.start_upload(current_principal(), request)
        return pb.StartUploadResponse(upload=upload)

    async def AppendUpload(
        self, request: pb.AppendUploadRequest, context: Context
    ) -> pb.AppendUploadResponse:
        upload = await self._domain.files.append_upload(current_principal(), request)
        return pb.AppendUploadResponse(upload=upload)

    async def GetUpload(
        self, request: pb.GetUploadRequest, context: Context
    ) -> pb.GetUploadResponse:
        return pb.GetUploadResponse(upload=await self._domain.files.get_upload(request.name))

    async def FinishUpload(
        self, request: pb.FinishUploadRequest, context: Context
    ) -> pb.FinishUploadResponse:
        file = await self._domain.files.finish_upload(current_principal(), request)
        return pb.FinishUploadResponse(file=file)

    async def CancelUpload(
        self, request: pb.CancelUploadRequest, context: Context
    ) -> pb.CancelUploadResponse:
        await self._domain.files.cancel_upload(current_principal(), request.name)
        return pb.CancelUploadResponse()

    async def GetFile(self, request: pb.GetFileRequest, context: Context) -> pb.GetFileResponse:
        return pb.GetFileResponse(file=await self._domain.files.get(request))

    async def ListFiles(
        self, request: pb.ListFilesRequest, context: Context
    ) -> pb.ListFilesResponse:
        return await self._domain.files.list(request)

    async def DownloadFile(
        self, request: pb.DownloadFileRequest, context: Context
    ) -> AsyncIterator[pb.DownloadFileResponse]:
        async for frame in self._domain.files.download(request):
            yield frame

    async def ExportMyData(
        self, request: pb.ExportMyDataRequest, context: Context
    ) -> pb.ExportMyDataResponse:
        return await self._domain.exports.export_my_data(current_principal(), request)

    async def GetDataExport(
        self, request: pb.GetDataExportRequest, context: Context
    ) -> pb.GetDataExportResponse:
        return await self._domain.exports.get(request)

    async def DeleteFile(
        self, request: pb.DeleteFileRequest, context: Context
    ) -> pb.DeleteFileResponse:
        await self._domain.files.delete(current_principal(), request.name)
        return pb.DeleteFileResponse()


#: Answered with the bytes a cached window was stored as.
PRESERIALIZED = frozenset({"GetContextWindow"})
