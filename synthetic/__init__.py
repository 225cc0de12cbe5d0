"""The H3 paper's synthetic in-context recall tasks (induction head, associative recall) and their trainer."""

from synthetic.tasks import TASKS, SyntheticData, make_task
from synthetic.train import SyntheticRun, train_synthetic

__all__ = ["TASKS", "SyntheticData", "SyntheticRun", "make_task", "train_synthetic"]
