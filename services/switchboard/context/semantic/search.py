"""Search by meaning and by words (SearchContext, SearchMemoryItems' modes): filled
in by the search work of issue 56."""

from __future__ import annotations

from switchboard.api.context.v1 import context_pb2 as pb


class Search:
    async def search_context(self, request: pb.SearchContextRequest) -> pb.SearchContextResponse:
        raise NotImplementedError
