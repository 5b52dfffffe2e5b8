"""``leanft eval ... lm_eval=TASKS``: EleutherAI's lm-evaluation-harness on a run or a model (optional extra).

The tasks are resolved and their data loaded before the model is, so a task name lm-eval does not know, or a
task whose data cannot be reached (no network, not in the local ``datasets`` cache), ends in one line.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedTokenizerBase

from leanft.core.errors import LeanftError
from leanft.run.options import doc

logger = logging.getLogger(__name__)


@dataclass
class LmEvalOptions:
    """The ``leanft eval`` keys that run lm-eval tasks."""

    lm_eval: str | None = doc("comma-separated lm-eval task names (needs pip install lm-eval, and the tasks' data)",
                              None)
    lm_eval_include: str | None = doc("a folder of your own lm-eval task YAML files", None)
    lm_eval_limit: int | None = doc("lm-eval: examples per task (null = all)", None)
    lm_eval_fewshot: int | None = doc("lm-eval: few-shot examples (null = the task's own)", None)
    lm_eval_batch_size: int = doc("lm-eval: requests per forward pass", 8)


def load_tasks(options: LmEvalOptions) -> dict:
    """lm-eval's task objects for ``options.lm_eval``, data loaded; a LeanftError says what is missing."""
    if importlib.util.find_spec("lm_eval") is None:
        raise LeanftError("lm_eval=... needs the lm-eval package: pip install lm-eval")
    from lm_eval.tasks import TaskManager, get_task_dict

    names = [name.strip() for name in (options.lm_eval or "").split(",") if name.strip()]
    if not names:
        raise LeanftError("lm_eval= names no task: give lm-eval task names, e.g. lm_eval=hellaswag,arc_easy")
    manager = TaskManager(include_path=options.lm_eval_include, verbosity="ERROR")
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        where = f" (nor in {options.lm_eval_include})" if options.lm_eval_include else ""
        raise LeanftError(f"lm-eval has no task {', '.join(map(repr, unknown))}{where}: `lm-eval ls tasks` lists them")
    try:
        return get_task_dict(names, manager)
    except Exception as error:  # datasets raises many kinds when data is out of reach; the first line says which
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise LeanftError(f"the data of lm-eval task {', '.join(names)} cannot be reached ({first_line}): load it "
                          "once where the hub is reachable (it is cached), or point a task YAML at local files"
                          ) from None


def run_tasks(model: nn.Module, tokenizer: PreTrainedTokenizerBase, tasks: dict, options: LmEvalOptions) -> dict:
    """Each task's metrics (``{task: {metric: value}}``) for ``model``, as lm-eval's ``simple_evaluate`` gives them."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    device = next(model.parameters()).device
    lm = HFLM(pretrained=model, tokenizer=tokenizer, device=str(device), batch_size=options.lm_eval_batch_size)
    was_training = model.training
    model.eval()
    try:
        results = simple_evaluate(
            model=lm, tasks=list(tasks.values()), num_fewshot=options.lm_eval_fewshot, limit=options.lm_eval_limit,
            log_samples=False, bootstrap_iters=0, verbosity="ERROR",
        )
    finally:
        model.train(was_training)
    return {task: {key: value for key, value in metrics.items() if key != "alias"}
            for task, metrics in results["results"].items()}
