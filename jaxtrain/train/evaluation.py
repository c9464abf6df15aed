"""Held-out evaluation during training: the ``Trainer``'s ``evaluate``, watched by the watchdog as
steps are, with the run's moving average of the weights when it keeps one."""

from __future__ import annotations

import math

import jax

from jaxtrain.algorithms.ema import evaluation_params
from jaxtrain.parallel.mesh import global_batch_from_local
from jaxtrain.train.events import Event
from jaxtrain.train.setup import eval_batch_size


class EvaluationMixin:
    """Methods of ``Trainer`` that evaluate. Expects the Trainer's attributes."""

    def evaluate(self) -> float | None:
        """The held-out loss. The watchdog watches it as it watches steps: each finished batch is
        progress. Compiling the eval step (its first use in this process) is not watched, as the
        first step is not. The EVAL_START/EVAL_END callbacks run with the watchdog paused; one that
        reports progress arms it (ICL scoring beats after each finished batch and pauses it again
        before a batch whose program compiles first)."""
        loader = self.parts.eval_loader
        if loader is None:  # no held-out data: ICL tasks (EVAL_END's callbacks) still run, once a step
            if getattr(self, "_evaluated_at", None) != self.step:
                self._evaluated_at = self.step
                with self.watchdog.paused():
                    self.events.fire(Event.EVAL_START, self)
                    self.events.fire(Event.EVAL_END, self)
            return None
        with self.watchdog.paused():
            self.events.fire(Event.EVAL_START, self)
        batch_size = eval_batch_size(self.cfg)
        limit = self.cfg.eval_subset_num_batches
        outs = []
        params = evaluation_params(self.state)  # the average's adapters joined to the weights once, not per batch
        for index, local in enumerate(loader.batches(batch_size, drop_last=bool(self.cfg.eval_loader.drop_last))):
            if 0 <= limit <= index:
                break
            batch = global_batch_from_local(local, self.parts.mesh)
            if not self._eval_compiled:
                self._compile_eval_step(batch)
            outs.append(self.parts.eval_step(params, batch))
            if index == 0:
                self.faults.during_eval(self.step)
            if len(outs) > 1:  # one batch in flight; the one before it has finished
                jax.block_until_ready(outs[-2])
                self.watchdog.beat()
        if not outs:
            return None
        # summed on the host once all batches are done (adding on the device compiles one more program)
        outs = jax.device_get(outs)
        self.watchdog.beat()
        loss_sum = math.fsum(float(out["loss_sum"]) for out in outs)
        loss = loss_sum / max(math.fsum(float(out["tokens"]) for out in outs), 1.0)
        self.eval_history.append((self.step, loss))
        record = {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}
        self._write_metrics(record)
        self.print(f"step {self.step}: held-out loss {loss:.4f}, perplexity {record['eval/perplexity']:.2f}")
        with self.watchdog.paused():
            self.events.fire(Event.EVAL_END, self)
        return loss

    def _compile_eval_step(self, batch: dict[str, jax.Array]) -> None:
        """Compile the eval step with the watchdog paused; its calls then find it compiled."""
        lower = getattr(self.parts.eval_step, "lower", None)
        if lower is not None:
            with self.watchdog.paused():
                lower(evaluation_params(self.state), batch).compile()
            self.watchdog.beat()  # the batches from here on are watched, even in the first evaluation
        self._eval_compiled = True
