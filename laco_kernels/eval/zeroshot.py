"""Zero-shot accuracy through lm-eval's Python API, on a model object already in memory.

    zeroshot(model, tok, ["piqa", "arc_easy"])                       # tasks lm-eval knows
    zeroshot(model, tok, ["my_task"], include_path="tasks/")          # plus local task YAMLs

Nothing here needs network access when the tasks' data are local (``dataset_path: json`` with
``data_files``); hub-hosted tasks need their datasets in the Hugging Face cache when
``HF_HUB_OFFLINE=1``.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Union

import torch.nn as nn


def zeroshot(model: nn.Module, tokenizer, tasks: Union[str, Sequence[str]], include_path: Optional[str] = None,
             limit: Optional[Union[int, float]] = None, *, batch_size: int = 1, num_fewshot: int = 0,
             seed: int = 1234, include_defaults: bool = True) -> Dict[str, Dict[str, float]]:
    """Zero-shot scores of ``model`` on lm-eval ``tasks``.

    model: a Hugging Face causal LM (evaluated where it is, in eval mode); tokenizer: its tokenizer;
    tasks: task names (or one name); include_path: a folder of extra task YAMLs; limit: examples
    per task (int) or fraction (float), None for all; include_defaults=False: only the tasks under
    include_path (skips indexing lm-eval's thousands of built-in task files). Returns ``{task: {metric: value}}`` with the
    metric names lm-eval reports, stripped of their filter suffix (``"acc"``, ``"acc_norm"``,
    ``"acc_stderr"``, ...), plus ``"samples"`` (examples evaluated).
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names: List[str] = [tasks] if isinstance(tasks, str) else list(tasks)
    if not names:
        raise ValueError("give at least one task name")
    if include_path is not None and not os.path.isdir(include_path):
        raise FileNotFoundError(f"include_path {include_path!r} is not a directory of task YAML files")
    if not include_defaults and include_path is None:
        raise ValueError("include_defaults=False needs an include_path holding the task files")
    manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {unknown}" + (f" (also searched {include_path!r})"
                                                                 if include_path else ""))
    was_training = model.training
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                              log_samples=False, bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed,
                              torch_random_seed=seed, fewshot_random_seed=seed)
    finally:
        model.train(was_training)
    results: Dict[str, Dict[str, float]] = {}
    for task, metrics in out["results"].items():
        clean = {}
        for key, value in metrics.items():
            if key == "alias" or not isinstance(value, (int, float)):
                continue
            clean[key.split(",")[0]] = float(value)
        n = out.get("n-samples", {}).get(task, {})
        if n:
            clean["samples"] = int(n.get("effective", n.get("original", 0)))
        results[task] = clean
    return results
