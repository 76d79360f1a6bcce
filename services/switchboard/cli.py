"""The ``switchboard`` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from switchboard.deploy import commands, meshargs
from switchboard.platform.config import ConfigError, KernelSettings
from switchboard.platform.observe.logging import configure_logging
from switchboard.platform.security.credentials import keyfile

if TYPE_CHECKING:
    from switchboard.settings import Settings

log = logging.getLogger("switchboard.cli")

EXIT_CONFIG = 2
#: ``erase-user`` refused (a workspace owned alone not named, an unknown account).
EXIT_REFUSED = 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="switchboard", description="Switchboard: a typed gRPC mesh for AI assistants."
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the services in one process")
    serve.add_argument("--host", help="address to bind (SWITCHBOARD_HOST)")
    serve.add_argument("--port", type=int, help="port, 0 for any free one (SWITCHBOARD_PORT)")
    serve.add_argument(
        "--services", help="comma-separated services to run (SWITCHBOARD_SERVICES); default all"
    )
    serve.add_argument(
        "--dev",
        action="store_true",
        default=None,
        help="development mode: built-in insecure secrets allowed (SWITCHBOARD_DEV_MODE)",
    )
    keygen = sub.add_parser(
        "keygen", help="write a new Ed25519 signing key (PEM) for access tokens"
    )
    keygen.add_argument(
        "path",
        help="output file, named <kid>.pem (the stem becomes the key id); "
        "missing directories are created owner-only",
    )
    keygen.add_argument(
        "--force", action="store_true", help="replace the file if it exists (the old key is lost)"
    )
    sub.add_parser("migrate", help="apply pending database migrations and exit")
    erase = sub.add_parser(
        "erase-user",
        help="delete an account and erase its data, as DeleteMyAccount does (docs/privacy.md)",
    )
    erase.add_argument("user", help="the account, users/{id}")
    erase.add_argument(
        "--delete",
        action="append",
        default=[],
        metavar="WORKSPACE",
        help="a workspace the account owns alone, deleted with it (workspaces/{w}; repeatable)",
    )
    erase.add_argument(
        "--hand-over",
        action="append",
        default=[],
        metavar="WORKSPACE=USER",
        help="a workspace the account owns alone and its member who becomes its owner "
        "(workspaces/{w}=users/{u}; repeatable)",
    )
    sub.add_parser("erasures", help="list the newest erasures and the parts they still wait for")
    commands.add_envoy_parser(sub)
    commands.add_edge_health_parser(sub)
    commands.add_dev_cert_parser(sub)
    meshargs.add_mesh_parser(sub)
    return parser


def _keygen(path: str, *, force: bool) -> int:
    target = Path(path)
    if target.is_dir():
        print(f"switchboard: {target} is a directory; name the key file", file=sys.stderr)
        return EXIT_CONFIG
    if target.exists() and not force:
        # A signing key is not replaceable: tokens it signed stop verifying.
        print(
            f"switchboard: {target} exists; refusing to overwrite a signing key "
            "(--force replaces it)",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    try:
        kid = keyfile.write_signing_key(target, replace=force)
    except ValueError as exc:
        print(f"switchboard: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except FileExistsError:  # created by someone else since the check above
        print(f"switchboard: {target} exists; refusing to overwrite it", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        where = exc.filename or target
        print(f"switchboard: cannot write {target}: {where}: {exc.strerror}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"wrote signing key {kid!r} to {target}")
    return 0


async def _migrate(settings: KernelSettings) -> int:
    from switchboard.mesh import database_setting
    from switchboard.platform.store.db import open_database

    with database_setting():
        database = await open_database(
            settings.database_url.get_secret_value(),
            timeout_s=settings.database_timeout_s,
            migrate=True,
        )
    await database.close()
    log.info("database is at the latest migration")
    return 0


async def _privacy(args: argparse.Namespace, settings: KernelSettings) -> int:
    """``erase-user`` and ``erasures``, on the deployment's database (docs/privacy.md)."""
    from google.protobuf import json_format

    from switchboard.api.auth.v1 import auth_pb2
    from switchboard.auth.erasure import AccountDeletion
    from switchboard.auth.mapping import erasure
    from switchboard.auth.store import AuthStore
    from switchboard.mesh import database_setting
    from switchboard.platform.errors import SwitchboardError
    from switchboard.platform.events.erasure.store import ErasureStore
    from switchboard.platform.store.db import open_database
    from switchboard.platform.store.outbox import Outbox
    from switchboard.platform.values.resources import UserName

    with database_setting():
        database = await open_database(
            settings.database_url.get_secret_value(),
            timeout_s=settings.database_timeout_s,
            migrate=False,
        )
    try:
        if args.command == "erasures":
            for record in await ErasureStore(database).list():
                print(json.dumps(json_format.MessageToDict(erasure(record))))
            return 0
        user = UserName.parse_or_none(args.user)
        if user is None:
            print("switchboard: erase-user takes users/{id}", file=sys.stderr)
            return EXIT_CONFIG
        owned = [
            auth_pb2.OwnedWorkspace(workspace=w, action=auth_pb2.OWNED_WORKSPACE_ACTION_DELETE)
            for w in args.delete
        ]
        for pair in args.hand_over:
            workspace, _, owner = pair.partition("=")
            owned.append(
                auth_pb2.OwnedWorkspace(
                    workspace=workspace,
                    action=auth_pb2.OWNED_WORKSPACE_ACTION_HAND_OVER,
                    new_owner=owner,
                )
            )
        deletion = AccountDeletion(AuthStore(database), Outbox(database))
        try:
            begun = await deletion.erase(user.user, owned)
        except SwitchboardError as refused:
            print(f"switchboard: refused: {refused}", file=sys.stderr)
            return EXIT_REFUSED
        print(json.dumps(json_format.MessageToDict(begun)))
        return 0
    finally:
        await database.close()


async def _serve(settings: Settings) -> int:
    from switchboard.mesh import create_server
    from switchboard.platform.rpc.server import tune_gc

    server, _port = await create_server(settings)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    # signal.signal rather than loop.add_signal_handler: asyncio restores the
    # default disposition when the loop closes, so a repeated SIGTERM arriving
    # while the process exits after a clean drain would kill it with -15. This
    # handler outlives the loop and ignores signals once shutdown has begun.
    def on_signal(signum: int, _frame: object) -> None:
        if loop.is_closed() or stop.is_set():
            return
        loop.call_soon_threadsafe(stop.set)
        log.info("signal received", extra={"signal": signal.Signals(signum).name})

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    tune_gc(settings.kernel)
    await server.start()
    await stop.wait()
    await server.shutdown()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.version:
        print(metadata.version("switchboard-mesh"))
        return 0
    if args.command == "keygen":
        return _keygen(args.path, force=args.force)
    if args.command == "envoy":
        return commands.run_envoy(args)
    if args.command == "edge-health":
        return commands.run_edge_health(args)
    if args.command == "dev-cert":
        return commands.run_dev_cert(args)
    if args.command == "mesh":
        from switchboard.deploy import launcher

        return launcher.run_mesh(args)
    if args.command not in ("serve", "migrate", "erase-user", "erasures"):
        _parser().print_help()
        return EXIT_CONFIG
    return _run_server(args)


def _run_server(args: argparse.Namespace) -> int:
    """``serve``, ``migrate``, ``erase-user`` and ``erasures``: the only commands that need
    the server's code, which
    is imported here so that the others (keygen, envoy, dev-cert, mesh) start in a
    fraction of the time."""
    from switchboard.mesh import check_settings
    from switchboard.platform.rpc.server import BindError
    from switchboard.settings import load_settings

    flags = (
        {"host": args.host, "port": args.port, "services": args.services, "dev_mode": args.dev}
        if args.command == "serve"
        else {}
    )
    overrides: dict[str, object] = {k: v for k, v in flags.items() if v is not None}
    try:
        settings = load_settings(**overrides)
        # Before logging starts: every bad setting gets the same one-line answer.
        check_settings(settings)
    except ConfigError as exc:
        print(f"switchboard: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    kernel = settings.kernel
    configure_logging(kernel.log_level, kernel.log_format)
    for name in kernel.insecure_defaults_in_use():
        log.warning(
            "DEV MODE: %s is not set; a development value stands in for it (insecure); "
            "never run like this in production",
            name,
        )
    try:
        if args.command == "serve":
            code = asyncio.run(_serve(settings))
        elif args.command == "migrate":
            code = asyncio.run(_migrate(kernel))
        else:
            code = asyncio.run(_privacy(args, kernel))
        # Interpreter teardown resets Python-level signal handlers to the default
        # (death by signal); the drain is done, so late signals are ignored.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        log.info("exiting", extra={"exit_code": code})
        return code
    except BindError as exc:
        log.error("cannot start: %s (SWITCHBOARD_HOST, SWITCHBOARD_PORT)", exc)  # noqa: TRY400
        return EXIT_CONFIG
    except ConfigError as exc:
        log.error("cannot start: %s", exc)  # noqa: TRY400 - no traceback for a config problem
        return EXIT_CONFIG


if __name__ == "__main__":
    raise SystemExit(main())
