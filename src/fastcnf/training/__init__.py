"""Training: the one loop (trainer), hooks, tasks, schedules, checkpoints."""
