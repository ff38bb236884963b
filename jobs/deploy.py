"""Deploy (or roll over) the draftsmith endpoint on a running Ray cluster.

    draftsmith deploy --recipe tiny-eagle3 --address http://127.0.0.1:8265
    python -m jobs.deploy --config serve/config.yaml --address http://127.0.0.1:8265 \\
        [--recipe tiny-eagle3] [--set model_ref=models:/NAME@champion] [--set replicas=2] [--dry-run]

Resolves each app's `models:/NAME@ALIAS` to the version it names now and deploys that version (what
`serve deploy` does with the file, plus the pin). Run it again after the alias moved to roll the replicas over
to the new champion without failing requests.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import yaml

from draftsmith.provenance import PROJECT_ROOT
from draftsmith.serving.deploy import DeployError, deploy, load_serve_config, render
from draftsmith.serving.model_source import ModelSourceError

# The project's Serve config wherever the command runs (`draftsmith deploy` outside the checkout too).
SERVE_CONFIG = PROJECT_ROOT / "serve" / "config.yaml"


def recipe_serving(name: str) -> tuple[dict, str]:
    """(serving args, tracking URI) of a recipe: what it sets, and its registry's champion unless it names one."""
    from draftsmith import tracking
    from draftsmith.recipe.loader import load_recipe

    recipe = load_recipe(name)
    serving = recipe.serving.model_dump(mode="json", exclude_defaults=True)
    serving.setdefault("model_ref", f"models:/{recipe.tracking.registry_name}@champion")
    return serving, tracking.resolve_tracking_uri(recipe.tracking, recipe.output_dir)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(SERVE_CONFIG), help="a Serve config (default: the project's)")
    parser.add_argument("--recipe", help="apply a recipe's `serving` section, its registry (tracking.uri) and, "
                        "unless set, model_ref models:/REGISTRY_NAME@champion")
    parser.add_argument("--address", default=os.environ.get("RAY_DASHBOARD_ADDRESS", "http://127.0.0.1:8265"),
                        help="the cluster's dashboard (as for `serve deploy -a`)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override an app arg")
    parser.add_argument("--tracking-uri", help="MLflow server of the registry (default $MLFLOW_TRACKING_URI)")
    parser.add_argument("--wait", type=float, default=900, help="seconds to wait for RUNNING")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and stop")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        recipe_args, tracking_uri = recipe_serving(args.recipe) if args.recipe else (None, None)
        config = render(load_serve_config(args.config), args.set, args.tracking_uri or tracking_uri, recipe_args)
        if args.dry_run:
            print(yaml.safe_dump(config, sort_keys=False))
            return 0
        deploy(config, args.address, args.wait)
    except (DeployError, ModelSourceError, FileNotFoundError) as exc:
        print(f"jobs.deploy: {exc}", file=sys.stderr)
        return 2
    http = config.get("http_options") or {}
    for app in config["applications"]:
        version = (app.get("args") or {}).get("model_version")
        print(f"{app['name']}: RUNNING{f' version {version}' if version else ''} at "
              f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}{app.get('route_prefix', '/')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
