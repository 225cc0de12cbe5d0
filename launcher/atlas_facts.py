"""Does Atlas's retriever learn from its reader alone? The fact-lookup experiment's command:
``python launcher/atlas_facts.py --config configs/debug_atlas_facts.yaml``.

Load the config (YAML, then ``key=value`` overrides) -> generate the fact-lookup task -> train every
setting (the four retriever losses and two frozen retrievers) from the same initial weights -> print a
table of gold recall and exact match on held-out questions; ``<out_dir>/results.json`` has the curves.
"""

from __future__ import annotations

import argparse
import sys

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.base.typed_config import build, deep_merge, parse_override, read_yaml
from hybrid_pretrain.synthetic.atlas_facts import SETTINGS, FactsRun, run_experiment, table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train Atlas on a generated fact-lookup task (the answer is only in one passage) with each "
        f"retriever setting ({', '.join(SETTINGS)}) and report the gold passage's recall and the reader's exact "
        "match on held-out questions, with closed-book exact match as the floor.",
        epilog="Example: python launcher/atlas_facts.py --config configs/debug_atlas_facts.yaml "
        "'settings=[pdist,random]' train.steps=200",
    )
    parser.add_argument("--config", default="configs/debug_atlas_facts.yaml", help="YAML file of the run")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config, e.g. train.steps=200")
    parser.add_argument("--service", action="store_true",
                        help="search through an index service (a child process, reloaded after each refresh) "
                        "instead of in-process")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the config's)")
    parser.add_argument("--no-progress", action="store_true", help="log evaluations as lines instead of bars")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        values = read_yaml(args.config, example="configs/debug_atlas_facts.yaml")
        for text in args.overrides:
            values = deep_merge(values, parse_override(text))
        run = build(FactsRun, values, source=args.config)
        if args.threads is not None:
            run.threads = args.threads
        run.validate()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = run_experiment(run, through_service=args.service, progress=not args.no_progress)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
