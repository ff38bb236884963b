"""Start the MLflow UI on a recipe's tracking store: its runs, metrics, plots and registered drafts.

    draftsmith ui --recipe tiny-eagle3                  # http://127.0.0.1:5000, until Ctrl-C
    draftsmith ui --recipe tiny-eagle3 --port 5001 --dry-run

The store is the recipe's tracking.uri, else $MLFLOW_TRACKING_URI, else OUTPUT_DIR/mlflow.db (what the pipeline
used). A recipe that tracks to an MLflow server already has its UI there: the command says where, and starts none.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from draftsmith.cli import parse_recipe, recipe_parser


def ui_command(uri: str, host: str, port: int) -> list[str]:
    """`mlflow ui` on a database store, in this interpreter (so the project's MLflow, whatever is on PATH)."""
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = recipe_parser(__doc__, prog)
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 exposes it: MLflow "
                        "then also needs --allowed-hosts, pass it with `mlflow ui` directly)")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    args = parser.parse_args(argv)
    recipe = parse_recipe(args)
    from draftsmith.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(recipe.tracking, recipe.output_dir)
    if uri.startswith(("http://", "https://")):
        print(f"{recipe.name} tracks to the MLflow server at {uri}: its UI is there (registry: {uri}/#/models)")
        return 0
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise FileNotFoundError(f"no MLflow database at {uri} yet: run `draftsmith pipeline --recipe {recipe.name}` "
                                "first (or set tracking.uri)")
    command = ui_command(uri, args.host, args.port)
    if args.dry_run:
        print(shlex.join(command))
        return 0
    print(f"MLflow UI for {recipe.name} at http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    os.execv(command[0], command)  # the UI is the process from here on: Ctrl-C and its exit code are mlflow's
