"""The loop's parts, one concern each: optimizer, LR schedule, precision, the run folder (checkpoint), metrics
and their log, early stopping, callbacks, the frozen-prefix cache, host memory and activation memory."""
