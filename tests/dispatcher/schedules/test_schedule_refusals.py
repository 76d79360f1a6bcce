"""What a refused schedule says (issue 67): a bad cron names the field by name and
position and why; a template naming a placeholder that does not exist is refused at
create and at update, naming it and the ones that do."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from tests.kits.authkit import detail
from tests.kits.contextkit import refused
from tests.kits.modulekit import module_database_url_fixture
from tests.kits.schedulekit import (
    Desk,
    create,
    cron,
    desk_fixture,
    desk_server_fixture,
    get,
    listed,
    update,
)

# One mesh per backend for the module; each test has a workspace and users of its own,
# and its schedules and firings go with it (``desk_fixture``).
pytestmark = [pytest.mark.service, pytest.mark.asyncio(loop_scope="module")]

CODE = grpc.StatusCode


module_database_url = module_database_url_fixture
desk_server, desk = desk_server_fixture, desk_fixture


def described(error: grpc.aio.AioRpcError) -> dict[str, str]:
    bad: error_details_pb2.BadRequest = detail(error, error_details_pb2.BadRequest)
    return {v.field: v.description for v in bad.field_violations}


@pytest.mark.parametrize(
    ("expression", "description"),
    [
        ("0 25 * * *", "the hour field (2nd of 5) '25' is out of range 0-23"),
        ("61 * * * *", "the minute field (1st of 5) '61' is out of range 0-59"),
        ("0 0 * 13 *", "the month field (4th of 5) '13' is out of range 1-12"),
        ("0 0 * * mon-funday", "the day-of-week field (5th of 5) 'funday' is not a number"),
        ("0 0 * * * 75", "the second field (6th of 6) '75' is out of range 0-59"),
        ("*/0 * * * *", "the minute field (1st of 5) step '0' in '*/0' must be"),
        ("0 0 30 2 *", "never matches a date: no month of the month field '2' has the"),
    ],
)
async def test_a_bad_cron_names_its_field_and_why(
    desk: Desk, expression: str, description: str
) -> None:
    error = await refused(create(desk, cron(expression)), CODE.INVALID_ARGUMENT)
    found = described(error)
    assert list(found) == ["schedule.cron"]
    assert found["schedule.cron"].startswith(description), found
    assert await listed(desk) == []


async def test_an_unknown_placeholder_is_refused_at_create_and_update(desk: Desk) -> None:
    typo = pb.Schedule(
        display_name="Daily", message_template="Report for {{dat}}", cron="0 8 * * *"
    )
    error = await refused(create(desk, typo), CODE.INVALID_ARGUMENT)
    assert described(error) == {
        "schedule.message_template": (
            "names an unknown placeholder {{dat}}: a template may name {{fire_time}}, "
            "{{date}}, {{schedule}}"
        )
    }
    assert await listed(desk) == []
    made = await create(desk, cron("0 8 * * *"))
    error = await refused(
        update(
            desk,
            pb.Schedule(name=made.name, message_template="{{ date }} {{when}} {{ Schedule }}"),
            "message_template",
        ),
        CODE.INVALID_ARGUMENT,
    )
    assert (
        "unknown placeholders {{Schedule}}, {{when}}:"
        in described(error)["schedule.message_template"]
    )
    assert (await get(desk, made.name)).message_template == "hello {{date}}"
    # The known ones, spaced or not, are taken.
    fine = await update(
        desk,
        pb.Schedule(name=made.name, message_template="{{ date }}: {{schedule}} at {{fire_time}}"),
        "message_template",
    )
    assert fine.message_template == "{{ date }}: {{schedule}} at {{fire_time}}"
