"""The ``semantic-server`` command: serve, and manage the local models.

Errors the user can fix (a bad GGUF, an unknown model) print one line and exit 1; only
bugs show a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from semantic_server.config import Settings
from semantic_server.errors import SemanticServerError


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
    from semantic_server.models.gguf_import import import_gguf

    dest = settings.models_dir / args.name
    result = import_gguf(args.gguf, dest, chat_template=args.chat_template,
                         overwrite=args.overwrite)
    print(f"imported {args.gguf} -> {result.path} in {result.seconds:.1f} s "
          f"({result.bytes_on_disk / 1e6:.0f} MB)")
    for note in result.as_float16:
        print(f"  stored as float16: {note}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semantic-server", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="start the HTTP server")
    serve.add_argument("--model", help="model id to load at startup")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.set_defaults(run=_serve)

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


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args, Settings())
    except SemanticServerError as exc:
        sys.exit(f"semantic-server: {exc}")
