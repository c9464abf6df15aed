"""Training methods layered on the train step and the loop's events (Composer's ``algorithms``)."""
