"""Model FLOPs per batch, MFU, and a sliding-window throughput meter.

FLOPs follow LLM Foundry's ``ComposerMPTCausalLM.flops_per_batch`` so MFU figures compare with
its published tables (LoRA, which Foundry reports no MFU for, leaves out the frozen weights'
gradients, which are not computed); the meter follows Composer's ``SpeedMonitor`` windowing.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jaxtrain.config.schema import ModelConfig


def mpt_active_params(model: ModelConfig) -> int:
    """LLM Foundry's ``n_active_params`` of an MPT model: every parameter once (a tied embedding
    counted once), less the input embedding ``wte`` when ``tie_word_embeddings`` is false (a
    lookup table does no matmul; the separate ``lm_head`` stays counted). This is the ``n_params``
    that ``mpt_flops_per_batch`` takes."""
    from jaxtrain.models.mpt_config import mpt_param_count

    total = mpt_param_count(model)
    return total if model.tie_word_embeddings else total - model.vocab_size * model.d_model


def mpt_flops_per_batch(n_params: int, n_layers: int, d_model: int, seq_len: int, batch_size: int) -> float:
    """Model FLOPs of one training batch (forward + backward): ``3*B*(2*N*L + n_layers*4*d_model*L^2)``.

    ``n_params`` is LLM Foundry's "active" count (``mpt_active_params``): every parameter once,
    minus the input embedding ``wte`` when ``tie_word_embeddings`` is false. Padding is not discounted, and the
    backward pass is taken as twice the forward.
    """
    params_flops_per_seq = 2 * n_params * seq_len
    attn_flops_per_seq = n_layers * 2 * 2 * d_model * seq_len**2
    return float(3 * batch_size * (params_flops_per_seq + attn_flops_per_seq))


def lora_flops_per_batch(n_params: int, n_adapter_params: int, n_layers: int, d_model: int, seq_len: int,
                         batch_size: int) -> float:
    """Model FLOPs of one LoRA training batch: ``B*((4*N + 6*A)*L + 3*n_layers*4*d_model*L^2)``.

    The frozen weights (``n_params``, counted as ``mpt_flops_per_batch`` counts them) take part in
    the forward pass and the gradient of their inputs (2 FLOPs per parameter and token each) but
    have no weight gradient; the ``n_adapter_params`` adapter parameters have all three; attention
    is as in ``mpt_flops_per_batch``. Foundry's formula (6 per parameter) would count the frozen
    weights' gradients that are never computed, half as much again."""
    params_flops_per_seq = (4 * n_params + 6 * n_adapter_params) * seq_len
    attn_flops_per_seq = 3 * n_layers * 2 * 2 * d_model * seq_len**2
    return float(batch_size * (params_flops_per_seq + attn_flops_per_seq))


def training_flops_per_batch(model: ModelConfig, seq_len: int, batch_size: int) -> float:
    """Model FLOPs of one training batch of ``model``: Foundry's formula, or with LoRA adapters
    (``model.peft_config``) ``lora_flops_per_batch``, plus, for DoRA with dropout, the adapted
    layers' second product (of the dropped input) forward and back."""
    from jaxtrain.layers.lora import adapted_weight_count, adapter_param_count

    active = mpt_active_params(model)
    peft = getattr(model, "peft_config", None)
    if peft is None:
        return mpt_flops_per_batch(active, model.n_layers, model.d_model, seq_len, batch_size)
    flops = lora_flops_per_batch(active, adapter_param_count(model), model.n_layers, model.d_model, seq_len,
                                 batch_size)
    if peft.use_dora and peft.lora_dropout > 0:  # DoRA's product of the dropped input and W, and its gradient
        flops += 4.0 * adapted_weight_count(model) * seq_len * batch_size
    return flops


def mfu(flops_per_second_per_device: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s per device over the device's dense peak."""
    if peak <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak}")
    return flops_per_second_per_device / peak


class ThroughputMeter:
    """Rates over the last ``window_size`` steps, as Composer's SpeedMonitor computes them.

    Call ``update`` at the end of every step with the wall-clock time of that moment (any
    monotonic clock, in seconds) and the step's global samples, tokens and model FLOPs. Rates
    compare the newest entry with the one ``window_size`` steps older, so the first steps (and
    the compile time they carry) fall out of the window. Like SpeedMonitor, ``metrics()`` is
    empty until ``window_size + 1`` steps have been seen, unless ``report_partial_window`` is set,
    in which case any two or more steps give rates. Time spent between steps is left out either
    by ``resume`` (the window keeps its steps, as SpeedMonitor's does across an evaluation) or by
    ``start`` (a fresh window).
    """

    def __init__(
        self,
        window_size: int = 100,
        *,
        num_devices: int = 1,
        peak_flops_per_device: float | None = None,
        report_partial_window: bool = False,
    ):
        if window_size < 1:
            raise ValueError(f"window_size must be at least 1, got {window_size}")
        if num_devices < 1:
            raise ValueError(f"num_devices must be at least 1, got {num_devices}")
        self.window_size = window_size
        self.num_devices = num_devices
        self.peak_flops_per_device = peak_flops_per_device
        self.report_partial_window = report_partial_window
        maxlen = window_size + 1
        self._wall_time: collections.deque[float] = collections.deque(maxlen=maxlen)
        self._samples: collections.deque[int] = collections.deque(maxlen=maxlen)  # cumulative
        self._tokens: collections.deque[int] = collections.deque(maxlen=maxlen)  # cumulative
        self._flops: collections.deque[float] = collections.deque(maxlen=maxlen)  # per step
        self._total_samples = 0
        self._total_tokens = 0
        self._paused = 0.0  # seconds left out by resume(); the stamps above are wall time less this
        # Every timed step of the run (a step whose start the meter saw), windows restarted or not.
        self._run = {"steps": 0, "seconds": 0.0, "samples": 0, "tokens": 0, "flops": 0.0}

    def start(self, wall_time: float) -> None:
        """Begin a fresh window at ``wall_time`` (after compilation or a rollback, say).

        Earlier steps are dropped, so time spent outside training steps never enters a rate.
        """
        self._wall_time.clear()
        self._samples.clear()
        self._tokens.clear()
        self._flops.clear()
        self._wall_time.append(float(wall_time) - self._paused)
        self._samples.append(self._total_samples)
        self._tokens.append(self._total_tokens)
        self._flops.append(0.0)

    def resume(self, wall_time: float) -> None:
        """Go on with the same window at ``wall_time``, leaving out the time since the last step
        ended (an evaluation, say), as Composer pauses its training clock while it evaluates: the
        window keeps its steps and no rate counts the pause. Without earlier steps, ``start``."""
        if not self._wall_time:
            self.start(wall_time)
            return
        self._paused += max(float(wall_time) - self._paused - self._wall_time[-1], 0.0)

    def update(self, wall_time: float, *, samples: int, tokens: int, flops: float = 0.0) -> None:
        """Record the end of one step: its time stamp and the step's global samples, tokens, FLOPs."""
        wall_time = float(wall_time) - self._paused
        if self._wall_time:  # the step began at the previous stamp: it counts in the run's average
            run = self._run
            run["steps"] += 1
            run["seconds"] += wall_time - self._wall_time[-1]
            run["samples"] += int(samples)
            run["tokens"] += int(tokens)
            run["flops"] += float(flops)
        self._total_samples += int(samples)
        self._total_tokens += int(tokens)
        self._wall_time.append(wall_time)
        self._samples.append(self._total_samples)
        self._tokens.append(self._total_tokens)
        self._flops.append(float(flops))

    @property
    def window_steps(self) -> int:
        """How many steps the window's rates cover now."""
        return max(len(self._wall_time) - 1, 0)

    @property
    def ready(self) -> bool:
        """Whether ``metrics()`` has rates to report."""
        needed = 2 if self.report_partial_window else self.window_size + 1
        return len(self._wall_time) >= needed

    def metrics(self) -> dict[str, float]:
        """Composer-named rates over the window; empty when not ``ready`` or no time has passed."""
        if not self.ready:
            return {}
        elapsed = self._wall_time[-1] - self._wall_time[0]
        if elapsed <= 0:
            return {}
        n = self.num_devices
        batches_per_sec = (len(self._wall_time) - 1) / elapsed
        samples_per_sec = (self._samples[-1] - self._samples[0]) / elapsed
        out = {
            "throughput/batches_per_sec": batches_per_sec,
            "throughput/samples_per_sec": samples_per_sec,
            "throughput/device/batches_per_sec": batches_per_sec / n,
            "throughput/device/samples_per_sec": samples_per_sec / n,
        }
        elapsed_tokens = self._tokens[-1] - self._tokens[0]
        if elapsed_tokens > 0:
            out["throughput/tokens_per_sec"] = elapsed_tokens / elapsed
            out["throughput/device/tokens_per_sec"] = elapsed_tokens / elapsed / n
        # The oldest entry only marks the window's start time; its own FLOPs happened before it.
        elapsed_flops = sum(self._flops) - self._flops[0]
        if elapsed_flops > 0:
            flops_per_sec = elapsed_flops / elapsed
            out["throughput/flops_per_sec"] = flops_per_sec
            out["throughput/device/flops_per_sec"] = flops_per_sec / n
            if self.peak_flops_per_device:
                out["throughput/device/mfu"] = mfu(flops_per_sec / n, self.peak_flops_per_device)
        return out

    def summary(self, peak_flops_per_device: float | None = None) -> dict[str, float]:
        """Short-named rates over whatever the window holds (at least one step after its start).

        Keys: ``batches_per_second``, ``samples_per_second``, ``tokens_per_second``,
        ``tokens_per_second_per_device``, ``flops_per_second_per_device`` and ``mfu`` (when a peak
        is known: ``peak_flops_per_device`` or the meter's own). Empty before any step.
        """
        if len(self._wall_time) < 2:
            return {}
        elapsed = self._wall_time[-1] - self._wall_time[0]
        if elapsed <= 0:
            return {}
        n = self.num_devices
        tokens_per_second = (self._tokens[-1] - self._tokens[0]) / elapsed
        flops_per_second_per_device = (sum(self._flops) - self._flops[0]) / elapsed / n
        out = {
            "batches_per_second": (len(self._wall_time) - 1) / elapsed,
            "samples_per_second": (self._samples[-1] - self._samples[0]) / elapsed,
            "tokens_per_second": tokens_per_second,
            "tokens_per_second_per_device": tokens_per_second / n,
            "flops_per_second_per_device": flops_per_second_per_device,
        }
        peak = peak_flops_per_device or self.peak_flops_per_device
        if peak and flops_per_second_per_device > 0:
            out["mfu"] = mfu(flops_per_second_per_device, peak)
        return out

    def run_summary(self, peak_flops_per_device: float | None = None) -> dict[str, float]:
        """Rates over every timed step so far, not only the last window's: ``steps``, ``seconds``,
        ``tokens_per_second``, ``samples_per_second``, ``flops_per_second_per_device`` and ``mfu``
        (when a peak is known). A step counts when the meter saw its start (the previous step's
        end or a ``start()``), so time outside steps (compiling, evaluating, saving) is left out.
        Empty before any timed step."""
        run = self._run
        if not run["steps"] or run["seconds"] <= 0:
            return {}
        seconds = run["seconds"]
        flops_per_second_per_device = run["flops"] / seconds / self.num_devices
        out = {
            "steps": run["steps"],
            "seconds": seconds,
            "samples_per_second": run["samples"] / seconds,
            "tokens_per_second": run["tokens"] / seconds,
            "flops_per_second_per_device": flops_per_second_per_device,
        }
        peak = peak_flops_per_device or self.peak_flops_per_device
        if peak and flops_per_second_per_device > 0:
            out["mfu"] = mfu(flops_per_second_per_device, peak)
        return out
