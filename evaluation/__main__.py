"""lm-eval with our model registered: ``python -m hybrid_pretrain.evaluation run --model hybrid-pretrain ...``.

Full form: ``python -m hybrid_pretrain.evaluation run --model hybrid-pretrain --model_args path=CKPT --tasks T
--include_path DIR``.

lm-evaluation-harness's own CLI (every flag of ``lm_eval``) with the ``hybrid-pretrain`` model registered:
lm-eval 0.4 finds models only in its in-process registry (it has no plugin entry points), so the plain
``lm_eval`` command cannot see a model defined outside its package. Pass ``--device`` as a flag, not in
--model_args (the harness hands it to the model itself).
"""

from lm_eval.__main__ import cli_evaluate

import hybrid_pretrain.evaluation.lm_eval_adapter  # noqa: F401  (registers hybrid-pretrain)

if __name__ == "__main__":
    cli_evaluate()
