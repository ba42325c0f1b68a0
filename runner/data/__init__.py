"""The data jobs read: the bearing-fault task (bearing.py), real text for causal LMs (text_sources.py
over text_files.py and the built-in corpora.py) and the zero-shot choice tasks (choice_tasks.py,
written for lm-evaluation-harness by lm_eval_tasks.py)."""
