"""A workspace's semantic index settings and progress (Get/UpdateSemanticIndex):
filled in by the indexer work of issue 56."""

from __future__ import annotations

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.platform.security.policy import Principal


class SemanticIndexes:
    async def get(self, name: str) -> pb.SemanticIndex:
        raise NotImplementedError

    async def update(
        self, principal: Principal, request: pb.UpdateSemanticIndexRequest
    ) -> pb.SemanticIndex:
        raise NotImplementedError
