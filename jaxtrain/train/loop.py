"""The training loop: steps, held-out evaluation, checkpoints, logging, and events.

Host work (logging, checkpoints, callbacks) happens around the compiled step. A step's metrics
are fetched one step late, after the next step has been dispatched, so the device never waits
for the host.

Tokens are counted as LLM Foundry counts them (``jaxtrain.metrics.tokens``): padding left out,
from each batch on the host before it goes to the device. They give the logged token rates and
the run's token total (``train/time/token``, Composer's timestamp), which checkpoints keep; MFU
takes the padded length, as Foundry's FLOPs do.

Stopping: SIGINT/SIGTERM end the run after the current step with a checkpoint. In a multi-process
run every process must save the same step, so SIGTERM goes through JAX's preemption service
instead of a Python handler: the runtime's own SIGTERM handler tells the coordination service,
all processes agree on a step (the largest step any of them is at, plus one), and each process
learns it from ``multihost_utils.reached_preemption_sync_point``, asked after every step. A
SIGTERM to any one process thus stops all of them at the same step, each saving its shards of
that step's checkpoint and exiting 143.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

import jax
from jax.experimental.multihost_utils import reached_preemption_sync_point

from jaxtrain.checkpoint.manager import Checkpointer, CheckpointSaveError
from jaxtrain.config.schema import ConfigError
from jaxtrain.metrics.flops import ThroughputMeter
from jaxtrain.metrics.loggers import ConsoleProgress, JSONLLogger, TensorBoardLogger, tensorboard_log_dir
from jaxtrain.metrics.tokens import TrainTokens, data_position
from jaxtrain.parallel.mesh import global_batch_from_local
from jaxtrain.train.evaluation import EvaluationMixin
from jaxtrain.train.events import Event, EventBus
from jaxtrain.train.health import FaultInjector, HealthMonitor, Watchdog, control_array, install_stop_handlers
from jaxtrain.train.resume import RecoveryMixin
from jaxtrain.train.resume_settings import tokenizer_record
from jaxtrain.train.setup import RunParts, interval_batches
from jaxtrain.train.supervisor import ReachedStep
from jaxtrain.train.summary import FitResult, is_out_of_lineage, out_of_lineage_incidents


class Trainer(EvaluationMixin, RecoveryMixin):
    """Runs a built ``RunParts`` to ``max_duration``, resuming from ``save_folder`` if asked."""

    def __init__(self, parts: RunParts, *, callbacks: list | None = None, started: float | None = None):
        """``started``: a ``time.perf_counter()`` reading from process start, for time to first step."""
        self.started = started
        self.parts = parts
        self.cfg = parts.cfg
        self.state = parts.state
        self.events = EventBus(callbacks)
        self.step = 0
        self.tokens = 0  # tokens trained on through self.step, padding left out (checkpoints keep it)
        self.train_tokens = TrainTokens(parts.train_loader, self.cfg.global_train_batch_size * self.cfg.max_seq_len)
        self.last_metrics: dict[str, float] = {}
        self.progress: ConsoleProgress | None = None  # while fitting
        self.eval_history: list[tuple[int, float]] = []
        self._stop_signal: int | None = None
        self._data_wait = 0.0
        self.stopped_unhealthy: str | None = None
        self.incidents: list[dict[str, Any]] = []
        self.positions: dict[int, tuple[int, int]] = {}  # step -> loader position of its batch
        self.skip_positions: set[tuple[int, int]] = set()  # loader positions never trained on
        cfg = self.cfg
        self.monitor = HealthMonitor(cfg.health)
        self.faults = FaultInjector(cfg.faults, cfg.run_folder)
        self.skip_steps = {int(s) for s in cfg.health.skip_steps}
        self.use_control = self.faults.active or bool(self.skip_steps)
        self.watchdog = Watchdog(
            timeout=cfg.health.watchdog_timeout,
            factor=cfg.health.watchdog_factor,
            minimum=cfg.health.watchdog_min,
            stacks_path=os.path.join(cfg.run_folder, "hang-stacks.txt"),
            on_hang=lambda idle: self.record_incident("hang", idle_seconds=round(idle, 1)),
        )
        self.eval_every = interval_batches(cfg, cfg.eval_interval, "eval_interval", parts)
        self.save_every = interval_batches(cfg, cfg.save_interval, "save_interval", parts) if cfg.save_folder else 0
        self.log_every = interval_batches(cfg, cfg.console_log_interval, "console_log_interval", parts) or 1
        os.makedirs(cfg.run_folder, exist_ok=True)
        # One process writes the run's logs; the others would only duplicate them.
        self.is_primary = jax.process_index() == 0
        self.metrics_file = JSONLLogger(os.path.join(cfg.run_folder, "metrics.jsonl")) if self.is_primary else None
        self.tensorboard = (
            TensorBoardLogger(tensorboard_log_dir(cfg.loggers.get("tensorboard"), cfg.run_folder, cfg.run_name))
            if "tensorboard" in cfg.loggers and self.is_primary
            else None
        )
        window = int((cfg.callbacks.get("speed_monitor") or {}).get("window_size", 10))
        self.meter = ThroughputMeter(window_size=window, num_devices=jax.device_count(),
                                     peak_flops_per_device=parts.peak_flops_per_device)
        self._window_steps = 0  # the steps the last logged rates cover
        try:
            self.checkpointer = Checkpointer(cfg.save_folder, keep=cfg.save_num_checkpoints_to_keep, faults=self.faults,
                                             staging=os.path.join(cfg.run_folder, "checkpoint-staging")
                                             ) if cfg.save_folder else None
        except ConfigError as err:  # a store that cannot be opened: say which key names it
            raise ConfigError(str(err) if str(err).startswith("save_folder") else f"save_folder: {err}") from None
        self.preemption_sync = _preemption_service_running()
        self._eval_compiled = False  # whether this process has compiled the eval step yet
        self.reached = ReachedStep.from_env()  # tells a supervisor the step the run is at

    def _reached(self, step: int) -> None:
        if self.reached is not None:
            self.reached.write(step)

    # ------------------------------------------------------------------ checkpoints

    def _save_tokenizer(self) -> None:
        if self.checkpointer is not None and jax.process_index() == 0:
            self.checkpointer.save_tokenizer(self.parts.tokenizer)

    def _meta(self) -> dict[str, Any]:
        return {**super()._meta(), "tokens": self.tokens, "tokenizer": tokenizer_record(self.parts.tokenizer)}

    def _restore(self, step: int) -> None:
        super()._restore(step)
        stored = self._restored_meta.get("tokens")
        # A checkpoint saved before the count was kept: every position of every batch, as counted then.
        self.tokens = int(stored) if stored is not None else (
            self.step * self.cfg.global_train_batch_size * self.cfg.max_seq_len)

    def save(self, *, force: bool = False) -> None:
        if self.checkpointer is None:
            return
        # Not watched: a save waits for the previous one's write and uploads it, which takes as long
        # as the checkpoint is large and the storage slow (minutes for a large model), not a
        # step's time; its own failures end in retries and CheckpointSaveError.
        with self.watchdog.paused():
            saved = self.checkpointer.save(self.step, self.checkpoint_items(), self._meta(), force=force)
        if saved:
            self.events.fire(Event.CHECKPOINT, self)

    # ------------------------------------------------------------------ logging

    def print(self, message: str) -> None:
        if self.progress is not None:
            self.progress.print_line(message)
        else:
            print(message, flush=True)

    def _write_metrics(self, record: dict[str, float], step: int | None = None) -> None:
        step = self.step if step is None else step
        if self.metrics_file is not None:
            self.metrics_file.log_metrics(step, record)
        if self.tensorboard is not None:
            self.tensorboard.log_metrics(step, record)

    def record_incident(self, kind: str, **details: Any) -> None:
        """An event worth knowing about in an unattended run: kept in metrics.jsonl and checkpoints."""
        record = {"incident": kind, "step": details.pop("step", self.step), **details}
        self.incidents.append(record)
        if self.metrics_file is not None:
            self.metrics_file.log_record(record["step"], {k: v for k, v in record.items() if k != "step"})

    def _on_step_done(self, step: int, device_metrics: dict[str, jax.Array], done_at: float | None, tokens: int,
                      tokens_total: int, *, timed: bool = True) -> str:
        """Log one finished step and return the health action: "ok", "rollback" or "stop".

        ``done_at``: when the step was seen finished as its call returned (``None``: it ran
        asynchronously, and it has finished once its metrics arrive here). ``tokens``: the
        step's batch's tokens, padding left out; ``tokens_total``: the run's through this step."""
        metrics = {key: float(value) for key, value in jax.device_get(device_metrics).items()}
        metrics["time/token"] = tokens_total
        now = time.perf_counter() if done_at is None else done_at
        if timed:
            self.meter.update(now, tokens=tokens, flops=self.parts.flops_per_batch, samples=self.cfg.global_train_batch_size)
            metrics.update(self.meter.summary(self.parts.peak_flops_per_device))
            metrics.update(self.meter.metrics())  # Composer's names (throughput/*, device/*), on full windows
            self._window_steps = self.meter.window_steps
        else:  # the first step carries the runtime's first-call set-up: the window starts at its end
            self.meter.start(now)
        # Host time spent getting the batch (reading, packing, transfer) that the step then used.
        metrics["data_wait_seconds"] = self._data_wait
        self.watchdog.beat(now - self._last_step_time if timed and self._last_step_time else None)
        self._last_step_time = now
        action, incident = self.monitor.observe(metrics)
        if incident is not None:
            self.record_incident(incident, step=step, loss=metrics["loss"], applied=bool(metrics.get("applied", 1)))
            self.print(f"step {step}: {incident} loss {metrics['loss']:.4g}; update {'applied' if metrics.get('applied', 1) else 'skipped'}")
        self.last_metrics = metrics
        self.events.fire(Event.BATCH_END, self)
        if step % self.log_every == 0 or step == self.parts.total_batches:
            record = {f"train/{k}": v for k, v in metrics.items() if k not in ("finite", "spike", "applied")}
            self._write_metrics(record, step)
            if self.progress is not None:
                self.progress.update(step, metrics)
        return action

    # ------------------------------------------------------------------ signals

    def _on_stop_signal(self, signum: int) -> None:
        if self._stop_signal is not None:  # a second signal: stop now
            raise StopNow
        self._stop_signal = signum

    # ------------------------------------------------------------------ fit

    def fit(self) -> FitResult:
        """Train to ``max_duration``. SIGINT/SIGTERM end the run after the current step with a
        checkpoint (a second signal stops at once); the handlers stay until the final save is done."""
        # With JAX's preemption service, SIGTERM is the runtime's: its handler starts the agreement.
        previous_handlers = install_stop_handlers(self._on_stop_signal, sigterm=not self.preemption_sync)
        try:
            return self._fit()
        except CheckpointSaveError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            self.record_incident("checkpoint_failed", reason=str(err))
            if self.checkpointer is not None:
                try:
                    self.checkpointer.close()
                except BaseException:  # noqa: BLE001 - the failure is already being reported
                    pass
            raise
        except BaseException:
            # Let a checkpoint that is being written finish, so the failure does not cost it.
            if self.checkpointer is not None:
                try:
                    self.checkpointer.close()
                except Exception:
                    pass
            raise
        finally:
            for sig, old in previous_handlers.items():
                signal.signal(sig, old)

    def _fit(self) -> FitResult:
        start_wall = time.perf_counter()
        cfg, parts = self.cfg, self.parts
        self.progress = None
        self.maybe_resume()
        already_complete = self.step > 0 and self.step >= parts.total_batches
        # What an earlier process of this run logged past the step it starts from (a crash after the
        # last checkpoint, or before the first) is logged again from here; its restarts and hangs stay.
        if self.metrics_file is not None:
            # a fresh start logs step 0 too (an evaluation first); a resumed run's checkpoint step is logged
            dropped = self.metrics_file.drop_after(self.step if self.step > 0 else -1, keep=is_out_of_lineage)
            if dropped and self.step == 0:
                self.print(f"notice: {self.metrics_file.path}: removed {dropped} records an earlier run logged "
                           f"(this run starts at step 0 and logs its steps anew)")
        if self.step > 0 and self.tensorboard is not None:  # TensorBoard hides it
            self.tensorboard.purge_from(self.step + 1)
        self.progress = ConsoleProgress(
            parts.total_batches, self.step, enabled=cfg.progress_bar and self.is_primary, log_every=self.log_every,
            lines=cfg.log_to_console,
        )
        self._save_tokenizer()
        self.events.fire(Event.FIT_START, self)
        self._reached(self.step)
        first_eval = self.eval_history[0][1] if self.eval_history else None
        self.watchdog.start()  # unarmed until a step or an evaluation batch has finished
        try:
            if cfg.eval_first and self.step == 0 and not self.eval_history:
                first_eval = self.evaluate()
            self.watchdog.pause()  # the first step may take its time, as compiling does
            self.seconds_to_first_step = None  # the speed window starts when the first step has ended
            self._last_step_time = None
            if cfg.health.nan_policy == "rollback" or cfg.health.spike_policy == "rollback":
                if self.checkpointer is not None and self.checkpointer.latest_step() is None:
                    self.save(force=True)  # something to roll back to
            first_eval = self._train_until_done(first_eval, start_wall)
            interrupted = self._stop_signal is not None and self.step < parts.total_batches
            eval_loss = None
            if interrupted:
                self.print(f"stopping at step {self.step} ({signal.Signals(self._stop_signal).name}); saving a checkpoint")
            elif self.stopped_unhealthy:
                self.print(f"stopping at step {self.step}: {self.stopped_unhealthy}")
            elif self.eval_every or parts.eval_loader is not None:
                last_eval_step = self.eval_history[-1][0] if self.eval_history else -1
                eval_loss = self.evaluate() if last_eval_step != self.step else self.eval_history[-1][1]
        finally:
            self.watchdog.stop()
        if self.checkpointer is not None:
            if self.checkpointer.latest_step() != self.step:
                self.save(force=True)
            self.checkpointer.close()
        self.events.fire(Event.FIT_END, self)
        self.progress.close()
        if self.metrics_file is not None:
            self.metrics_file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        kinds = [record["incident"] for record in self.incidents] + out_of_lineage_incidents(
            os.path.join(cfg.run_folder, "metrics.jsonl"))
        run_rates = self.meter.run_summary(self.parts.peak_flops_per_device)
        return FitResult(
            step=self.step,
            tokens=self.tokens,
            interrupted=interrupted,
            stop_signal=signal.Signals(self._stop_signal).name if interrupted else None,
            stopped_unhealthy=self.stopped_unhealthy,
            incidents={kind: kinds.count(kind) for kind in sorted(set(kinds))},
            train_loss=self.last_metrics.get("loss"),
            eval_loss=eval_loss,
            first_eval_loss=first_eval,
            tokens_per_second=self.last_metrics.get("tokens_per_second"),
            mfu=self.last_metrics.get("mfu"),
            window_steps=self._window_steps if "tokens_per_second" in self.last_metrics else 0,
            mean_tokens_per_second=run_rates.get("tokens_per_second"),
            mean_mfu=run_rates.get("mfu"),
            timed_steps=int(run_rates.get("steps", 0)),
            wall_seconds=time.perf_counter() - start_wall,
            seconds_to_first_step=self.seconds_to_first_step,
            already_complete=already_complete,
        )

    def _next_batch(self, loader_iter) -> dict[str, Any]:
        """The next training batch, passing over data positions marked to be skipped."""
        loader = self.parts.train_loader
        while (position := data_position(loader.state_dict())) in self.skip_positions:
            next(loader_iter)
            self.print(f"skipping the batch at data position {position} (it caused a rollback)")
        self.positions[self.step + 1] = position
        self.positions.pop(self.step + 1 - 1000, None)
        return next(loader_iter)

    def _train_until_done(self, first_eval: float | None, start_wall: float) -> float | None:
        parts = self.parts
        pending: tuple[int, Any, float | None, int, int] | None = None  # _on_step_done's arguments
        loader_iter = iter(parts.train_loader)
        control_sharding = parts.state_shardings.step
        while self.step < parts.total_batches and self._stop_signal is None and self.stopped_unhealthy is None:
            self.events.fire(Event.BATCH_START, self)
            waited = time.perf_counter()
            local = self._next_batch(loader_iter)
            tokens = self.train_tokens.count(local, self.positions[self.step + 1])
            batch = global_batch_from_local(local, parts.mesh)
            self._data_wait = time.perf_counter() - waited
            self._reached(self.step + 1)
            if parts.with_control:
                next_step = self.step + 1
                position = self.positions[next_step]
                control = control_array(self.faults.loss_multiplier(next_step, position), next_step in self.skip_steps)
                self.state, metrics = parts.train_step(self.state, batch, jax.device_put(control, control_sharding))
            else:
                self.state, metrics = parts.train_step(self.state, batch)
            # The CPU runs a step in the call itself: it ended now. Elsewhere it runs on while the
            # next batch is prepared, and its metrics, read one step later, say when it ended.
            # (Taking the time when the metrics are read would, on the CPU, include the next step.)
            done_at = time.perf_counter() if jax.tree.leaves(metrics)[0].is_ready() else None
            self.faults.during_step(self.step + 1)
            self.step += 1
            self.tokens += tokens
            actions = []
            if pending is not None:
                actions.append((pending[0], self._on_step_done(*pending)))
            pending = (self.step, metrics, done_at, tokens, self.tokens)
            if self.seconds_to_first_step is None or self.eval_every and self.step % self.eval_every == 0:
                first_step = self.seconds_to_first_step is None
                if first_step:
                    jax.block_until_ready(metrics)
                    self.seconds_to_first_step = time.perf_counter() - (self.started or start_wall)
                actions.append((pending[0], self._on_step_done(*pending, timed=not first_step)))
                pending = None
            bad = [step for step, action in actions if action != "ok"]
            if bad:
                pending = None
                if self._handle_unhealthy(bad, dict(actions)):
                    continue
                break
            if self.eval_every and self.step % self.eval_every == 0:
                loss = self.evaluate()  # watched; the next step counts from its end
                first_eval = loss if first_eval is None else first_eval
                self.meter.resume(time.perf_counter())  # the window goes on; the evaluation's time is left out
                self._last_step_time = None
            # the last step is saved once the run has ended (its final evaluation in the checkpoint,
            # so that the same command run again finds the run complete)
            if self.save_every and self.step % self.save_every == 0 and self.step < parts.total_batches:
                self.save()
            elif self.checkpointer is not None:
                self.checkpointer.poll()  # a failed background write stops the run here, not later
            self.faults.after_step(self.step)
            if self.preemption_sync and self._stop_signal is None and reached_preemption_sync_point(self.step):
                self._stop_signal = signal.SIGTERM
        if pending is not None:
            action = self._on_step_done(*pending)
            if action != "ok":
                self._handle_unhealthy([pending[0]], {pending[0]: action})
        return first_eval


class StopNow(KeyboardInterrupt):
    """A second SIGINT or SIGTERM while the run was stopping after its step: stop at once."""


def _preemption_service_running() -> bool:
    """Whether this is a multi-process run with JAX's preemption sync manager (SIGTERM agreement)."""
    if jax.process_count() <= 1:
        return False
    from jax._src import distributed

    return getattr(distributed.global_state, "preemption_sync_manager", None) is not None
