"""A2A push notifications, driven by the official ``a2a-sdk`` client over its gRPC
transport against a real server on a free loopback port, delivered to a real HTTP
receiver on another one (``tests/infra/webhookreceiver.py``, which verifies every
Standard Webhooks signature with the ``standardwebhooks`` library).

A config is a per-task webhook of the server's webhook engine: the task's status
updates arrive as A2A ``StreamResponse`` JSON, in order, with the config's token,
signed when its scheme is ``StandardWebhooks``, retried after a failure; the four
config methods answer as the task's access rules say; a refused address is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import grpc
import pytest
from a2a.types import a2a_pb2 as a2a
from a2a.utils.errors import InvalidParamsError, TaskNotFoundError
from google.protobuf import json_format
from grpc import aio

from switchboard.integration.service import IntegrationHub
from switchboard.integration.webhooks.delivery import WebhookEngine
from tests.a2a.test_a2a import Agent, message, running_agent, stub
from tests.conftest import CALL_DEADLINE_S, built
from tests.infra.webhookreceiver import Endpoint, WebhookReceiver, running_receiver, until
from tests.kits.authkit import reasons
from tests.kits.contextkit import refused
from tests.kits.contextkit import violations as fields
from tests.kits.integrationkit import webhook_secret

pytestmark = pytest.mark.service

CODE = grpc.StatusCode
PUSH = "configuration.task_push_notification_config"


@pytest.fixture
async def agent() -> AsyncIterator[Agent]:
    async with running_agent() as running:
        yield running


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    async with running_receiver() as running:
        yield running


def _quick_retries(agent: Agent) -> None:
    """Retries within a test's time (30 s jittered backoff by default)."""
    webhooks = built(agent.server, IntegrationHub).webhooks
    assert isinstance(webhooks, WebhookEngine)
    webhooks.limits = dataclasses.replace(webhooks.limits, backoff_base_s=0.05, backoff_max_s=0.2)


def _updates(endpoint: Endpoint) -> list[a2a.TaskStatusUpdateEvent]:
    """The accepted notifications, each parsed as the StreamResponse it must be."""
    found = []
    for item in endpoint.accepted:
        response = json_format.ParseDict(item.body, a2a.StreamResponse())
        assert response.WhichOneof("payload") == "status_update"
        found.append(response.status_update)
    return found


def _states(endpoint: Endpoint) -> list[int]:
    return [update.status.state for update in _updates(endpoint)]


async def test_a_send_with_a_push_config_pushes_each_status_signed_with_its_token(
    agent: Agent, receiver: WebhookReceiver
) -> None:
    secret = webhook_secret()
    # The first delivery is answered 503: it comes again (the same webhook-id).
    endpoint = receiver.endpoint("task", [secret], fail_first=1)
    _quick_retries(agent)
    client = agent.client(agent.world.editor, streaming=False)
    try:
        request = a2a.SendMessageRequest(message=message("push me"))
        config = request.configuration.task_push_notification_config
        config.url = receiver.url("task")
        config.token = "the-task-token"
        config.authentication.scheme = "StandardWebhooks"
        config.authentication.credentials = secret
        [response] = [event async for event in client.send_message(request)]
        task = response.task
        assert task.status.state == a2a.TASK_STATE_COMPLETED

        def completed() -> bool:
            return a2a.TASK_STATE_COMPLETED in _states(endpoint)

        await until(completed, "the completed status pushed")
        assert endpoint.bad == []  # every request verified with the secret
        updates = _updates(endpoint)
        assert {update.task_id for update in updates} == {task.id}
        assert {update.context_id for update in updates} == {task.context_id}
        states = [update.status.state for update in updates]
        # Every status from the start, in order, once each.
        assert states == [
            a2a.TASK_STATE_SUBMITTED,
            a2a.TASK_STATE_WORKING,
            a2a.TASK_STATE_COMPLETED,
        ]
        sequences = [float(str(update.metadata["switchboard.sequence"])) for update in updates]
        assert sequences == sorted(set(sequences))
        for item in endpoint.accepted:
            assert item.headers["x-a2a-notification-token"] == "the-task-token"
            assert "authorization" not in item.headers
            assert item.headers["content-type"] == "application/json"
        # The 503 was retried with the same id; the others went once.
        first = endpoint.ids[0]
        assert endpoint.attempts[first] == 2
        assert len(set(endpoint.ids)) == len(endpoint.ids) == 3
        # A send's config is named by the message id; the token and credentials are
        # never returned.
        got = await client.get_task_push_notification_config(
            a2a.GetTaskPushNotificationConfigRequest(task_id=task.id, id=request.message.message_id)
        )
        assert got.url == receiver.url("task")
        assert got.task_id == task.id
        assert got.authentication.scheme == "StandardWebhooks"
        assert not got.token
        assert not got.authentication.credentials
    finally:
        await client.close()


async def test_push_configs_are_created_read_listed_deleted_as_the_task_allows(
    agent: Agent, receiver: WebhookReceiver
) -> None:
    world = agent.world
    endpoint = receiver.endpoint("later", [])
    editor = agent.client(world.editor, streaming=False)
    viewer, stranger = agent.client(world.viewer), agent.client(world.outsider)
    try:
        first = a2a.SendMessageRequest(message=message("x"))
        [response] = [event async for event in editor.send_message(first)]
        task = response.task
        url = receiver.url("later")
        made = await editor.create_task_push_notification_config(
            a2a.TaskPushNotificationConfig(
                task_id=task.id,
                url=url,
                token="t-1",
                authentication=a2a.AuthenticationInfo(scheme="Bearer", credentials="abc"),
            )
        )
        assert len(made.id) == 32  # assigned by the server
        assert (made.task_id, made.url, made.token) == (task.id, url, "")
        assert made.authentication.scheme == "Bearer"
        assert not made.authentication.credentials
        # A config of an ended task gets its status changes as the run still keeps them
        # (this one's, in memory: all of them), the final one last, once each.
        await until(
            lambda: a2a.TASK_STATE_COMPLETED in _states(endpoint), "the final status pushed"
        )
        states = _states(endpoint)
        assert states[-1] == a2a.TASK_STATE_COMPLETED
        assert states == sorted(set(states))  # submitted 1, working 2, completed 3
        item = endpoint.accepted[-1]
        assert item.headers["authorization"] == "Bearer abc"
        assert item.headers["x-a2a-notification-token"] == "t-1"
        assert "webhook-signature" not in item.headers
        assert item.headers["webhook-id"]
        assert item.headers["webhook-timestamp"]

        mine = await editor.create_task_push_notification_config(
            a2a.TaskPushNotificationConfig(task_id=task.id, id="mine", url=url)
        )
        assert mine.id == "mine"
        # Readers read and list (paged); the order is by id.
        got = await viewer.get_task_push_notification_config(
            a2a.GetTaskPushNotificationConfigRequest(task_id=task.id, id="mine")
        )
        assert got == mine
        ids: list[str] = []
        token = ""
        while True:
            page = await viewer.list_task_push_notification_configs(
                a2a.ListTaskPushNotificationConfigsRequest(
                    task_id=task.id, page_size=1, page_token=token
                )
            )
            ids += [config.id for config in page.configs]
            token = page.next_page_token
            if not token:
                break
        assert ids == sorted([made.id, "mine"])

        async with aio.insecure_channel(agent.server.address) as channel:
            raw = stub(channel)
            tenant = agent.tenant
            again = a2a.TaskPushNotificationConfig(
                tenant=tenant, task_id=task.id, id="mine", url=url
            )
            await refused(
                raw.CreateTaskPushNotificationConfig(
                    again, metadata=world.editor.md, timeout=CALL_DEADLINE_S
                ),
                CODE.ALREADY_EXISTS,
            )
            # A viewer may not create or delete; a stranger does not see the task.
            await refused(
                raw.CreateTaskPushNotificationConfig(
                    again, metadata=world.viewer.md, timeout=CALL_DEADLINE_S
                ),
                CODE.PERMISSION_DENIED,
            )
            await refused(
                raw.DeleteTaskPushNotificationConfig(
                    a2a.DeleteTaskPushNotificationConfigRequest(
                        tenant=tenant, task_id=task.id, id="mine"
                    ),
                    metadata=world.viewer.md,
                    timeout=CALL_DEADLINE_S,
                ),
                CODE.PERMISSION_DENIED,
            )
            hidden = await refused(
                raw.CreateTaskPushNotificationConfig(
                    again, metadata=world.outsider.md, timeout=CALL_DEADLINE_S
                ),
                CODE.NOT_FOUND,
            )
            assert reasons(hidden)[0] == ("a2a-protocol.org", "TASK_NOT_FOUND")
            # An address the egress policy refuses (cloud metadata): on the url.
            blocked = await refused(
                raw.CreateTaskPushNotificationConfig(
                    a2a.TaskPushNotificationConfig(
                        tenant=tenant, task_id=task.id, url="http://169.254.169.254/latest"
                    ),
                    metadata=world.editor.md,
                    timeout=CALL_DEADLINE_S,
                ),
                CODE.INVALID_ARGUMENT,
            )
            assert fields(blocked) == ["url"]
            assert reasons(blocked) == [
                ("a2a-protocol.org", "INVALID_PARAMS"),
                ("switchboard.dev", "ERROR_REASON_DESTINATION_BLOCKED"),
            ]
            # Malformed: every field named.
            bad = await refused(
                raw.CreateTaskPushNotificationConfig(
                    a2a.TaskPushNotificationConfig(
                        tenant=tenant,
                        task_id=task.id,
                        id="no/slash",
                        url="ftp://example.com/x",
                        token="two\nlines",
                        authentication=a2a.AuthenticationInfo(
                            scheme="StandardWebhooks", credentials="not-a-secret"
                        ),
                    ),
                    metadata=world.editor.md,
                    timeout=CALL_DEADLINE_S,
                ),
                CODE.INVALID_ARGUMENT,
            )
            assert fields(bad) == ["id", "url", "token", "authentication.credentials"]
            # At most 10 configs per task.
            for index in range(8):
                await raw.CreateTaskPushNotificationConfig(
                    a2a.TaskPushNotificationConfig(
                        tenant=tenant, task_id=task.id, id=f"n{index}", url=url
                    ),
                    metadata=world.editor.md,
                    timeout=CALL_DEADLINE_S,
                )
            await refused(
                raw.CreateTaskPushNotificationConfig(
                    a2a.TaskPushNotificationConfig(
                        tenant=tenant, task_id=task.id, id="eleventh", url=url
                    ),
                    metadata=world.editor.md,
                    timeout=CALL_DEADLINE_S,
                ),
                CODE.RESOURCE_EXHAUSTED,
            )

        with pytest.raises(TaskNotFoundError):
            await stranger.get_task_push_notification_config(
                a2a.GetTaskPushNotificationConfigRequest(task_id=task.id, id="mine")
            )
        with pytest.raises(InvalidParamsError):
            await editor.get_task_push_notification_config(
                a2a.GetTaskPushNotificationConfigRequest(task_id=task.id, id="a/b")
            )
        await editor.delete_task_push_notification_config(
            a2a.DeleteTaskPushNotificationConfigRequest(task_id=task.id, id="mine")
        )
        with pytest.raises(TaskNotFoundError):
            await viewer.get_task_push_notification_config(
                a2a.GetTaskPushNotificationConfigRequest(task_id=task.id, id="mine")
            )
        with pytest.raises(TaskNotFoundError):
            await editor.delete_task_push_notification_config(
                a2a.DeleteTaskPushNotificationConfigRequest(task_id=task.id, id="mine")
            )
        assert endpoint.bad == []
    finally:
        for client in (editor, viewer, stranger):
            await client.close()
