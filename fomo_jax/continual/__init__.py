"""The continual runner: tasks, methods, evaluation, budget and exact resume (spec §7-8, §10-11)."""
