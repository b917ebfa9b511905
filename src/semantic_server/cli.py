"""The ``semantic-server`` command: serve, manage local models, drive a running server.

Errors the user can fix (a bad GGUF, an unknown model) print one line and exit 1; only
bugs show a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

from semantic_server.config import Settings
from semantic_server.errors import SemanticServerError
from semantic_server.launch import AGENTS, LaunchError, launch, restore


class CliError(Exception):
    """A failure the user can act on: printed as one line, exit status 1."""


def _serve(args: argparse.Namespace, settings: Settings) -> None:
    from semantic_server.app import run

    overrides = {k: v for k, v in (("model", args.model), ("host", args.host),
                                   ("port", args.port)) if v is not None}
    run(settings.model_copy(update=overrides))


def _models_list(args: argparse.Namespace, settings: Settings) -> None:
    from semantic_server.models.catalog import ModelCatalog

    entries = ModelCatalog(settings.models_dir, settings.extra_models).available()
    if not entries:
        print(f"no models in {settings.models_dir}; run scripts/fetch_models or "
              "`semantic-server models import FILE.gguf --name NAME`")
        return
    width = max(len(e.model_id) for e in entries)
    for entry in entries:
        print(f"{entry.model_id:<{width}}  {entry.source:<11}  {entry.path or '(not cached)'}")


def _models_import(args: argparse.Namespace, settings: Settings) -> None:
    from semantic_server.models.catalog import NAME_RULE, is_name
    from semantic_server.models.gguf_import import import_gguf

    if not is_name(args.name):  # else no request could name the model
        raise CliError(f"--name {args.name!r}: a model id is {NAME_RULE}")
    dest = settings.models_dir / args.name
    result = import_gguf(args.gguf, dest, chat_template=args.chat_template,
                         overwrite=args.overwrite)
    print(f"imported {args.gguf} -> {result.path} in {result.seconds:.1f} s "
          f"({result.bytes_on_disk / 1e6:.0f} MB)")
    for note in result.as_float16:
        print(f"  stored as float16: {note}")


def _admin(settings: Settings, url: str | None, method: str, path: str,
           body: dict | None = None, timeout: float = 600) -> dict:
    """Call the running server's admin API with the key from SEMANTIC_ADMIN_KEY."""
    import httpx

    base = url or f"http://{settings.host}:{settings.port}"
    key = settings.admin_key.get_secret_value() if settings.admin_key else ""
    try:
        response = httpx.request(method, f"{base}{path}", json=body, timeout=timeout,
                                 headers={"X-Admin-Key": key})
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach the server at {base}: {exc}") from exc
    try:
        data = response.json()
    except ValueError:
        raise CliError(f"{base} answered {response.status_code} without JSON: "
                       f"{response.text[:200]!r}; is it a semantic-server?") from None
    if "error" in data:
        raise CliError(f"{response.status_code}: {data['error']['message']}")
    return data


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                     .rstrip() for row in rows)


def _swap(args: argparse.Namespace, settings: Settings) -> None:
    result = _admin(settings, args.url, "POST", "/admin/models/swap",
                    {"model_id": args.model, "timeout_seconds": args.timeout,
                     "mode": args.mode})
    print(f"{result['status']} ({result['mode']} path): {result['message']} "
          f"({result['duration_ms'] / 1e3:.2f} s, "
          f"{result['evicted_agents']} agent caches written to disk)")
    rows = [["step", "ms", "ok"]] + [[s["name"], f"{s['duration_ms']:.1f}", str(s["ok"])]
                                    for s in result["steps"]]
    print(_table(rows))
    if result["status"] != "success":
        raise CliError(f"swap {result['status']}")


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def _status(args: argparse.Namespace, settings: Settings) -> None:
    current = _admin(settings, args.url, "GET", "/admin/models/current", timeout=30)
    dims = current["dims"] or {}
    pool = current["kv_pool"]
    caches = current["caches"]
    rows = [["model", str(current["model_id"])], ["state", current["state"]],
            ["dims", f"{dims.get('n_layers')} layers x {dims.get('n_kv_heads')} KV heads x "
                     f"{dims.get('head_dim')} ({dims.get('kv_dtype')})"],
            ["cache tag", str(current["tag"])],
            ["KV pool", f"{mib(pool['used_bytes'])} hot + {mib(pool['reserved_bytes'])} "
                        f"reserved of {mib(pool['budget_bytes'])} (blocks of "
                        f"{pool['block_tokens']} tokens)"],
            ["agent caches", f"{caches['hot_agents']} hot ({mib(caches['hot_bytes'])}), "
                             f"{caches['cold_agents']} on disk ({mib(caches['cold_bytes'])} of "
                             f"{mib(caches['disk_budget_bytes'])} budget)"],
            ["MLX active", f"{current['memory']['mlx_active_bytes'] / 2**20:.0f} MiB"],
            ["memory budget", f"{mib(current['memory']['budget_bytes'])} for model weights "
                              "(a swap that fits beside loads beside)"],
            ["RSS", f"{current['memory']['rss_bytes'] / 2**20:.0f} MiB"]]
    if current.get("reason"):
        rows.append(["reason", current["reason"]])
    print(_table(rows))


def _agents(args: argparse.Namespace, settings: Settings) -> None:
    listing = _admin(settings, args.url, "GET", "/admin/agents", timeout=30)
    rows = [["agent", "state", "model", "tokens", "MiB"]]
    for agent in listing["hot"] + listing["cold"]:
        rows.append([agent["agent_id"], agent["state"], str(agent["model_id"]),
                     str(agent["tokens"]), f"{agent['bytes'] / 2**20:.1f}"])
    print(_table(rows) if len(rows) > 1 else "no agent caches")
    print("lookups: " + ", ".join(f"{k} {v}" for k, v in sorted(listing["lookups"].items())))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semantic-server", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="start the HTTP server")
    serve.add_argument("--model", help="model id to load at startup")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.set_defaults(run=_serve)

    for name, run, help_text in (("swap", _swap, "swap the running server's model"),
                                 ("status", _status, "the running server's model and state"),
                                 ("agents", _agents, "the running server's agent caches")):
        command = commands.add_parser(name, help=help_text)
        if name == "swap":
            command.add_argument("model", help="model id to swap to")
            command.add_argument("--timeout", type=float, default=60.0,
                                 help="sequential path: seconds to wait for running requests")
            command.add_argument("--mode", choices=["auto", "dual", "sequential"],
                                 default="auto", help="dual loads the target beside the "
                                 "serving model (nobody waits); auto picks it when it fits")
        command.add_argument("--url", help="server URL (default: SEMANTIC_HOST:SEMANTIC_PORT)")
        command.set_defaults(run=run)

    launch = commands.add_parser(
        "launch", help="run a coding agent on this server (settings written, server started "
        "if none answers)", description="Run a coding agent on this server; arguments after "
        "-- go to the agent.")
    launch.add_argument("agent", choices=sorted(AGENTS), help="the coding agent")
    launch.add_argument("--url", help="server URL (default: SEMANTIC_HOST:SEMANTIC_PORT; "
                        "started in the background if none answers there)")
    launch.add_argument("--model", help="model id (default: the serving model, or the first "
                        "whose context holds the agent's prompt)")
    launch.add_argument("--config", action="store_true",
                        help="only write the agent's settings and print them")
    launch.add_argument("--restore", action="store_true",
                        help="remove the settings files this command wrote for the agent")
    launch.set_defaults(run=_launch)

    models = commands.add_parser("models", help="list or import local models")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    listing = models_commands.add_parser("list", help="list the available models")
    listing.set_defaults(run=_models_list)
    imp = models_commands.add_parser("import", help="import a GGUF file as an MLX model")
    imp.add_argument("gguf", type=Path, help="the .gguf file")
    imp.add_argument("--name", required=True, help="model id (directory name under models/)")
    imp.add_argument("--chat-template", type=Path, help="a Jinja chat template file")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing import")
    imp.set_defaults(run=_models_import)
    return parser


def _launch(args: argparse.Namespace, settings: Settings) -> None:
    if args.restore:
        removed = restore(AGENTS[args.agent])
        print("\n".join(f"removed {path}" for path in removed) or "nothing to remove")
        return
    try:
        status = launch(args.agent, args.url, args.model, args.config, args.agent_args,
                        settings)
    except LaunchError as exc:
        raise CliError(str(exc)) from None
    if status:
        sys.exit(status)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    own, passed = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
        else (argv, [])
    args = build_parser().parse_args(own)
    args.agent_args = passed
    try:
        args.run(args, _settings())
    except (SemanticServerError, CliError) as exc:
        sys.exit(f"semantic-server: {exc}")


def _settings() -> Settings:
    """The settings from SEMANTIC_* variables; a bad value is one line naming the variable."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(f"SEMANTIC_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}"
                             for e in exc.errors())
        raise CliError(f"invalid setting: {problems}") from None
    except ValueError as exc:  # pydantic-settings' SettingsError: a list value that is not JSON
        raise CliError(f"invalid setting: {exc}") from None
