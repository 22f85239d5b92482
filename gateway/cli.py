"""``lora-gateway``: serve, worker, migrate, copy, gc, and admin commands (teams, keys, credits)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable

import anyio

from gateway.config import ConfigError, RouteSettings, Settings, load_settings
from gateway.errors import GatewayError
from gateway.logging import configure_logging
from gateway.services import accounts
from gateway.store.db import Database, MigrationsPending, SchemaTooNew, database_for
from gateway.store.migrations import NAMES


#: the config file when --config is not given
CONFIG_ENV = "LORA_GATEWAY_CONFIG"


def _config_path(args: argparse.Namespace) -> str | None:
    return getattr(args, "config", None) or os.environ.get(CONFIG_ENV) or None


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(_config_path(args))
    overrides: dict[str, Any] = {}
    if getattr(args, "host", None):
        overrides["host"] = args.host
    if getattr(args, "port", None) is not None:
        overrides["port"] = args.port
    if getattr(args, "data_dir", None):
        settings = _replace(settings, data_dir=args.data_dir)
    if overrides:
        import msgspec

        settings = msgspec.structs.replace(settings, server=msgspec.structs.replace(settings.server, **overrides))
    return settings


def _replace(settings: Settings, **kw: Any) -> Settings:
    import msgspec

    return msgspec.structs.replace(settings, **kw)


async def _with_db(settings: Settings, fn: Callable[[Database], Awaitable[Any]]) -> Any:
    db = database_for(settings, read_connections=1)
    await db.open(migrate=settings.database.migrate == "auto")
    try:
        return await fn(db)
    finally:
        await db.close()


def _base_url(settings: Settings) -> str:
    if settings.server.public_base_url:
        return settings.server.public_base_url.rstrip("/")
    host = settings.server.host
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{shown}:{settings.server.port}"


async def _bootstrap(settings: Settings) -> str | None:
    """On a new database: a default team with credits and one key, returned to be shown once."""

    async def go(db: Database) -> str | None:
        if await accounts.list_teams(db):
            return None
        _, new = await accounts.create_team(
            db, name="default", credits=settings.teams.bootstrap_credits,
            max_concurrent_trainings=settings.teams.max_concurrent_trainings,
        )
        return new.key

    return await _with_db(settings, go)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app

    settings = _settings(args)
    configure_logging(settings.logging.format, settings.logging.level)
    key = anyio.run(_bootstrap, settings)
    base = _base_url(settings)
    print(f"lora-gateway {_version()} on {base}  (data in {settings.data_path.resolve()})", flush=True)
    if key:
        print(
            "\nA default team was created with "
            f"{settings.teams.bootstrap_credits} credits. Its API key is shown only this once:\n\n"
            f"    {key}\n\n"
            "Try it:\n\n"
            f'    curl -s {base}/v2/me -H "X-API-Key: {key}"\n',
            flush=True,
        )
    else:
        print("Make another key with:  lora-gateway keys create <team-id>   (teams: lora-gateway teams list)", flush=True)
    print(f"API docs: {base}/schema/swagger", flush=True)
    config = uvicorn.Config(
        create_app(settings), host=settings.server.host, port=settings.server.port,
        lifespan="on", access_log=False, log_level="warning",
    )
    uvicorn.Server(config).run()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from gateway.context import open_gateway
    from gateway.engine.worker import Engine

    settings = _settings(args)
    configure_logging(settings.logging.format, settings.logging.level)

    async def run() -> None:
        async with open_gateway(settings) as gw:
            engine = Engine(gw)
            async with anyio.create_task_group() as tg:
                tg.start_soon(engine.run)
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        tg.cancel_scope.cancel()
                        break

    anyio.run(run)
    return 0


class NoDatabase(RuntimeError):
    pass


def _existing(settings: Settings, args: argparse.Namespace) -> None:
    """Admin commands work on a gateway's database; they never make a new, empty one."""
    if settings.database_backend != "sqlite" or settings.database_path.exists():
        return
    where = _config_path(args)
    how = (f"the config file {where}" if where else "the embedded defaults (no --config, no $" + CONFIG_ENV + ")")
    if getattr(args, "data_dir", None):
        how += f" with --data-dir {args.data_dir}"
    raise NoDatabase(
        f"no database at {settings.database_path} (from {how}). Point the command at the gateway's: "
        f"--data-dir DIR, --config FILE, or {CONFIG_ENV}=FILE (`lora-gateway serve` prints where its data is); "
        "`lora-gateway migrate` makes a new database")


def _admin_settings(args: argparse.Namespace, settings: Settings | None = None) -> Settings:
    """An admin command's settings: quiet logs, and a database that already exists."""
    settings = settings or _settings(args)
    configure_logging(settings.logging.format, "warning")
    _existing(settings, args)
    return settings


def _admin(args: argparse.Namespace, fn: Callable[[Database], Awaitable[Any]], settings: Settings | None = None) -> int:
    return anyio.run(_with_db, _admin_settings(args, settings), fn) or 0


def cmd_teams_create(args: argparse.Namespace) -> int:
    async def go(db: Database) -> None:
        team, new = await accounts.create_team(
            db, name=args.name, credits=args.credits, max_concurrent_trainings=args.max_trainings, email=args.email
        )
        print(f"team {team.id}  name={team.name}  credits={team.credits}  max_concurrent_trainings={team.max_concurrent_trainings}")
        if team.credits == 0:
            print(f"It has no credits: every charged request is refused (402) until you add some, e.g. "
                  f"`lora-gateway credits add {team.name} 1000` (or create it with --credits N).")
        print(f"API key (shown only this once): {new.key}")

    return _admin(args, go)


def cmd_teams_list(args: argparse.Namespace) -> int:
    async def go(db: Database) -> None:
        for t in await accounts.list_teams(db):
            rate = t.rate_limit_per_minute if t.rate_limit_per_minute is not None else "default"
            routes = f"  routing={t.routing}" if t.routing else ""
            print(f"{t.id}  {t.name!r}  credits={t.credits}  max_concurrent_trainings={t.max_concurrent_trainings}  rate_limit={rate}{routes}")

    return _admin(args, go)


def cmd_teams_limits(args: argparse.Namespace) -> int:
    async def go(db: Database) -> None:
        team = await accounts.resolve_team(db, args.team)
        t = await accounts.set_limits(
            db, team.id, max_concurrent_trainings=args.max_trainings, rate_limit_per_minute=args.rate_limit
        )
        print(f"team {t.id}  max_concurrent_trainings={t.max_concurrent_trainings}  rate_limit={t.rate_limit_per_minute}")

    return _admin(args, go)


def _route_from_args(args: argparse.Namespace) -> RouteSettings | None:
    if args.clear:
        return None
    if not args.providers:
        raise SystemExit("set-route: give --providers a,b (or --clear)")
    weights: dict[str, float] = {}
    for item in args.weights or []:
        name, sep, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise SystemExit(f"set-route: --weights takes name=number, got {item!r}") from None
        if not sep or weights[name.strip()] <= 0:
            raise SystemExit(f"set-route: --weights takes name=number (> 0), got {item!r}")
    providers = [x.strip() for x in args.providers.split(",") if x.strip()]
    return RouteSettings(strategy=args.strategy, providers=providers, weights=weights)


def cmd_teams_route(args: argparse.Namespace) -> int:
    settings = _settings(args)
    route = _route_from_args(args)

    async def go(db: Database) -> None:
        team = await accounts.resolve_team(db, args.team)
        routes = await accounts.set_route(db, team.id, args.operation, route, settings.providers)
        if not routes:
            print(f"team {team.id}  routes: the gateway's defaults")
        for op, r in sorted((routes or {}).items()):
            weights = "".join(f" {k}={v:g}" for k, v in r.get("weights", {}).items())
            print(f"team {team.id}  {op}: {r['strategy']} {','.join(r['providers'])}{weights}")

    return _admin(args, go, settings)


def cmd_credits_add(args: argparse.Namespace) -> int:
    async def go(db: Database) -> None:
        t = await accounts.add_credits(db, (await accounts.resolve_team(db, args.team)).id, args.amount, args.reason)
        print(f"team {t.id}  credits={t.credits}")

    return _admin(args, go)


def cmd_keys_create(args: argparse.Namespace) -> int:
    async def go(db: Database) -> None:
        new = await accounts.create_key(db, (await accounts.resolve_team(db, args.team)).id, args.name)
        print(f"key {new.record.id}  name={new.record.name}  prefix={new.record.prefix}")
        print(f"API key (shown only this once): {new.key}")

    return _admin(args, go)


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    async def go(db: Database) -> int:
        key = await accounts.resolve_key(db, args.key)
        if key.revoked_at is not None:
            print(f"key {key.id} ({key.prefix}…) was revoked already", file=sys.stderr)
            return 1
        await accounts.revoke_key(db, key.id)
        print(f"revoked key {key.id} ({key.prefix}…, {key.name!r})")
        return 0

    return _admin(args, go)


def cmd_keys_list(args: argparse.Namespace) -> int:
    async def go(db: Database) -> None:
        team = await accounts.resolve_team(db, args.team)
        keys = await accounts.list_keys(db, team.id)
        if not keys:
            print(f"team {team.id} ({team.name!r}) has no keys: `lora-gateway keys create {team.name}`")
        for k in keys:
            state = "revoked" if k.revoked_at else ("active" if k.active else "inactive")
            print(f"{k.id}  {k.prefix}…  {k.name!r}  {state}")

    return _admin(args, go)


def cmd_gc(args: argparse.Namespace) -> int:
    from gateway import retention
    from gateway.context import open_gateway

    settings = _admin_settings(args)

    async def go() -> None:
        async with open_gateway(settings) as gw:
            report = await retention.sweep(gw)
        days = settings.files.retention_days
        print(f"{report}  (files.retention_days: {days or 'keep forever'})")

    anyio.run(go)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    configure_logging(settings.logging.format, "warning")
    db = database_for(settings, read_connections=1)

    async def go() -> None:
        await db.open(migrate=not args.check)
        try:
            done = db.applied
        finally:
            await db.close()
        where = db.label
        if done:
            print(f"{where}: applied {', '.join(done)}")
        print(f"{where}: the schema is up to date ({len(NAMES)} migrations)")

    anyio.run(go)
    return 0


def cmd_copy(args: argparse.Namespace) -> int:
    from gateway.store.copy import CopyError, copy_database
    from gateway.store.db import database_at

    settings = _settings(args)
    configure_logging(settings.logging.format, "warning")
    try:
        source = database_at(settings, args.source) if args.source else database_for(settings, read_connections=1)
        dest = database_at(settings, args.dest)
    except ValueError as e:
        print(f"lora-gateway copy: {e}", file=sys.stderr)
        return 2

    src_path = getattr(source, "path", None)
    if src_path is not None and not Path(src_path).exists():
        print(f"lora-gateway copy: no database at {src_path}", file=sys.stderr)
        return 2

    async def go() -> int:
        await source.open(migrate=False)
        try:
            await dest.open(migrate=True)
            try:
                report = await copy_database(
                    source, dest, progress=lambda table, n: print(f"  {table}: {n} rows", flush=True))
            finally:
                await dest.close()
        finally:
            await source.close()
        print(f"copied {report.total} rows from {source.label} to {dest.label}")
        return 0

    try:
        return anyio.run(go)
    except CopyError as e:
        print(f"lora-gateway copy: {e}", file=sys.stderr)
        return 1


def _version() -> str:
    from gateway import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora-gateway", description="A self-hosted gateway for personal image LoRAs.")
    p.add_argument("--version", action="version", version=f"lora-gateway {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", "-c", help=f"YAML config file (default: ${CONFIG_ENV}, else the embedded defaults)")
        sp.add_argument("--data-dir", help="override data_dir (database, blobs, provider state)")

    s = sub.add_parser("serve", help="run the API (and, by default, the workers)")
    common(s)
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.set_defaults(fn=cmd_serve)

    s = sub.add_parser("worker", help="run only the engine's workers against the same database")
    common(s)
    s.set_defaults(fn=cmd_worker)

    s = sub.add_parser("migrate", help="bring the database's schema up to date (or --check it is)")
    common(s)
    s.add_argument("--check", action="store_true", help="change nothing; exit 2 if migrations are pending")
    s.set_defaults(fn=cmd_migrate)

    s = sub.add_parser("gc", help="delete generated images past files.retention_days, and work directories left behind")
    common(s)
    s.set_defaults(fn=cmd_gc)

    s = sub.add_parser("copy", help="copy every row into another, empty database (e.g. SQLite to PostgreSQL)")
    common(s)
    s.add_argument("--from", dest="source", metavar="URL",
                   help="the database to read (default: the configured one)")
    s.add_argument("--to", dest="dest", metavar="URL", required=True,
                   help="an empty database: sqlite:///PATH or postgresql://USER:PASSWORD@HOST/DB")
    s.set_defaults(fn=cmd_copy)

    teams = sub.add_parser("teams", help="manage teams").add_subparsers(dest="action", required=True)
    s = teams.add_parser("create", help="create a team with an owner and an API key")
    common(s)
    s.add_argument("name")
    s.add_argument("--credits", type=int, default=0)
    s.add_argument("--max-trainings", type=int, default=10, help="max_concurrent_trainings (default 10)")
    s.add_argument("--email")
    s.set_defaults(fn=cmd_teams_create)
    s = teams.add_parser("list", help="list teams")
    common(s)
    s.set_defaults(fn=cmd_teams_list)
    s = teams.add_parser("set-limits", help="set a team's max_concurrent_trainings and/or rate limit")
    common(s)
    s.add_argument("team", help="the team's id or name")
    s.add_argument("--max-trainings", type=int)
    s.add_argument("--rate-limit", type=int, help="requests per minute per key (0 = unlimited)")
    s.set_defaults(fn=cmd_teams_limits)
    s = teams.add_parser("set-route", help="give a team its own route for training or inference (or --clear it)")
    common(s)
    s.add_argument("team", help="the team's id or name")
    s.add_argument("--operation", choices=["training", "inference"], required=True)
    s.add_argument("--strategy", choices=["priority", "cheapest", "weighted"], default="priority")
    s.add_argument("--providers", help="provider instances, comma-separated, in priority order")
    s.add_argument("--weights", nargs="*", metavar="NAME=W", help="weighted only: a relative weight per instance")
    s.add_argument("--clear", action="store_true", help="drop the team's route: the gateway's default applies")
    s.set_defaults(fn=cmd_teams_route)

    credits = sub.add_parser("credits", help="manage credits").add_subparsers(dest="action", required=True)
    s = credits.add_parser("add", help="add (or, with a negative amount, remove) credits")
    common(s)
    s.add_argument("team", help="the team's id or name")
    s.add_argument("amount", type=int)
    s.add_argument("--reason", default="admin grant")
    s.set_defaults(fn=cmd_credits_add)

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="action", required=True)
    s = keys.add_parser("create", help="create a key (shown once)")
    common(s)
    s.add_argument("team", help="the team's id or name")
    s.add_argument("--name", default="default")
    s.set_defaults(fn=cmd_keys_create)
    s = keys.add_parser("revoke", help="revoke a key")
    common(s)
    s.add_argument("key", help="the key's id, its prefix (afk_XXXX, as `keys list` shows) or the key itself")
    s.set_defaults(fn=cmd_keys_revoke)
    s = keys.add_parser("list", help="list a team's keys")
    common(s)
    s.add_argument("team", help="the team's id or name")
    s.set_defaults(fn=cmd_keys_list)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"lora-gateway: config error: {e}", file=sys.stderr)
        return 2
    except (SchemaTooNew, MigrationsPending) as e:
        print(f"lora-gateway: {e}", file=sys.stderr)
        return 2
    except NoDatabase as e:
        print(f"lora-gateway: {e}", file=sys.stderr)
        return 2
    except GatewayError as e:
        print(f"lora-gateway: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

