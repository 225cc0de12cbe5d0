"""lm-evaluation-harness tasks on a checkpoint: ``python launcher/eval_harness.py CKPT --tasks T --include-path DIR``.

Reads like a table of contents: register the ``hybrid-pretrain`` model (evaluation.lm_eval_adapter)
-> index the task YAMLs (your --include-path folders; the harness's built-in tasks only without one,
since those download their data) -> ``lm_eval.simple_evaluate`` -> the harness's table on stderr and
the results as one JSON line on stdout. Needs the optional extra: ``pip install 'lm-eval>=0.4.5,<0.5'``.
(Named eval_harness, not lm_eval, so that running this script never shadows the ``lm_eval`` package.)
"""

from __future__ import annotations

import argparse
import json
import sys

import hybrid_pretrain.evaluation.lm_eval_adapter as adapter
from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.training.checkpoint import CheckpointError
from hybrid_pretrain.training.safe_load import add_trust_flag


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Evaluate a convert_checkpoint.py folder (or a run directory) on lm-evaluation-harness tasks; "
        "the last line printed is a JSON object with the per-task metrics.",
        epilog="Example: python launcher/eval_harness.py ckpt/debug_hybrid --tasks my_mc --include-path tasks/ "
        "--limit 100",
    )
    parser.add_argument("checkpoint", help="convert_checkpoint.py folder or run directory")
    parser.add_argument("--tasks", required=True, help="comma-separated task (or group) names")
    parser.add_argument("--include-path", action="append", default=[],
                        help="folder of task YAMLs (repeatable); when given, the built-in tasks are not indexed")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    parser.add_argument("--limit", type=float, default=None, help="at most this many documents per task "
                        "(a fraction below 1.0: that share)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=0, help="context window (default: the run's data.seq_len)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--seed", type=int, default=1234, help="few-shot sampling and generation seed")
    parser.add_argument("--output", help="also write the harness's full results JSON here")
    add_trust_flag(parser)
    return parser.parse_args(argv)


def evaluate(args: argparse.Namespace) -> dict:
    """The harness's results dict for `args` (see parse_args)."""
    import lm_eval  # optional: the `eval` extra
    from lm_eval.tasks import TaskManager  # optional: the `eval` extra

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    manager = TaskManager(include_path=args.include_path or None, include_defaults=not args.include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = ", ".join(args.include_path) or "the harness's built-in tasks"
        raise ConfigError(f"--tasks: no task named '{unknown[0]}' in {where}; expected a task or group name there")
    model = adapter.HybridPretrainLM(args.checkpoint, device=args.device, dtype=args.dtype,
                                     batch_size=args.batch_size, max_length=args.max_length,
                                     trust_checkpoint=args.trust_checkpoint)
    return lm_eval.simple_evaluate(model=model, tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                                   task_manager=manager, random_seed=args.seed, numpy_random_seed=args.seed,
                                   torch_random_seed=args.seed, fewshot_random_seed=args.seed, log_samples=False)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        # optional: the `eval` extra
        import lm_eval  # noqa: F401
    except ImportError:
        print("error: lm-eval is not installed; expected `pip install 'lm-eval>=0.4.5,<0.5'`", file=sys.stderr)
        return 2
    from lm_eval.utils import make_table  # optional: the `eval` extra

    try:
        results = evaluate(args)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(make_table(results), file=sys.stderr)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2, default=str)
    print(json.dumps({"checkpoint": args.checkpoint, "results": results["results"]}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
