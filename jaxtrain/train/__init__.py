"""Train state, loss, train step, optimizers, schedules, and the training loop."""
