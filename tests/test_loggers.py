"""JSONL and TensorBoard files read back, and the console's plain and live output."""

import io
import json
import os
import shutil
import struct
import time

import pytest
from tensorboardX import summary as tbx_summary
from tensorboardX.crc32c import crc32c as tbx_crc32c
from tensorboardX.record_writer import masked_crc32c
from tensorboardX.proto import event_pb2, summary_pb2

from jaxtrain.metrics import tfevents
from jaxtrain.metrics.loggers import (
    ConsoleProgress,
    JSONLLogger,
    TensorBoardLogger,
    append_jsonl,
    drop_records_after,
    format_console_line,
    tensorboard_log_dir,
)
from jaxtrain.tempfiles import temp_path
from jaxtrain.train.summary import is_out_of_lineage


def read_tfrecords(path):
    """Event protos from a TFRecord file: [u64 length][u32 crc][data][u32 crc] per record, both
    checksums verified with tensorboardX's record writer's."""
    events, data = [], path.read_bytes()
    offset = 0
    while offset < len(data):
        header = data[offset : offset + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[offset + 8 : offset + 12])
        assert header_crc == masked_crc32c(header)
        offset += 12
        payload = data[offset : offset + length]
        (payload_crc,) = struct.unpack("<I", data[offset + length : offset + length + 4])
        assert payload_crc == masked_crc32c(payload)
        event = event_pb2.Event()
        event.ParseFromString(payload)
        events.append(event)
        offset += length + 4
    return events


def test_jsonl_logger(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    logger = JSONLLogger(path)
    logger.log_metrics(1, {"train/loss": 5.5, "train/mfu": 0.25})
    logger.log_metrics(2, {"train/loss": float("nan")})
    logger.log_text("hello")
    lines = path.read_text().splitlines()  # readable before close: every line is flushed
    logger.close()
    records = [json.loads(line) for line in lines]
    assert records[0]["step"] == 1 and records[0]["train/loss"] == 5.5 and records[0]["train/mfu"] == 0.25
    assert records[1]["step"] == 2 and records[1]["train/loss"] is None
    assert records[2]["text"] == "hello"


def test_tensorboard_logger(tmp_path):
    logger = TensorBoardLogger(tmp_path / "tb")
    logger.log_metrics(1, {"train/loss": 5.5})
    logger.log_metrics(2, {"train/loss": 4.25, "train/lr": 1e-3})
    logger.log_text("resumed from step 2")
    logger.close()
    (event_file,) = (tmp_path / "tb").iterdir()
    assert event_file.name.startswith("events.out.tfevents.")
    events = read_tfrecords(event_file)
    assert events[0].file_version == "brain.Event:2"
    (text,) = [value for event in events for value in event.summary.value if value.metadata.plugin_data.plugin_name]
    assert text.metadata.plugin_data.plugin_name == "text" and text.tensor.string_val == [b"resumed from step 2"]
    scalars = [
        (event.step, value.tag, value.simple_value)
        for event in events
        for value in event.summary.value
        if value.HasField("simple_value")
    ]
    assert (1, "train/loss", 5.5) in scalars and (2, "train/loss", 4.25) in scalars
    assert any(step == 2 and tag == "train/lr" and v == pytest.approx(1e-3) for step, tag, v in scalars)


def test_event_encoding_matches_protobuf():
    """Each hand-encoded message is byte for byte what protobuf writes for the same fields."""
    values = [tfevents.scalar_value("train/loss", 5.5), tfevents.scalar_value("train/lr", -1e-3),
              tfevents.scalar_value("eval/perplexity", -1e300), tfevents.scalar_value("grad_norm", float("inf")),
              tfevents.text_value("log/text_summary", "héllo")]
    reference = [tbx_summary.scalar("train/loss", 5.5).value[0], tbx_summary.scalar("train/lr", -1e-3).value[0],
                 tbx_summary.scalar("eval/perplexity", -1e300).value[0],
                 tbx_summary.scalar("grad_norm", float("inf")).value[0], tbx_summary.text("log", "héllo").value[0]]
    for ours, theirs in zip(values, reference):
        assert ours == theirs.SerializeToString()
    summary = summary_pb2.Summary(value=reference)
    for step in (0, 7, 2**40, -1):
        expected = event_pb2.Event(wall_time=1234.5, step=step, summary=summary).SerializeToString()
        assert tfevents._event(1234.5, step, summary=b"".join(tfevents._bytes_field(1, v) for v in values)) == expected
    first = event_pb2.Event(wall_time=1.0, step=0, file_version="brain.Event:2").SerializeToString()
    assert tfevents._event(1.0, 0, file_version="brain.Event:2") == first
    start = event_pb2.Event(wall_time=1.0, step=5, session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START))
    assert tfevents._event(1.0, 5, session_start=True) == start.SerializeToString()
    assert tfevents.crc32c(b"123456789") == 0xE3069283 == tbx_crc32c(b"123456789")  # the CRC-32C check value


def test_console_line_format():
    metrics = {"loss": 5.1234, "tokens_per_second": 1234.4, "mfu": 0.1234}
    assert format_console_line(10, 100, metrics, 62.0) == "step 10/100 loss 5.123 tok/s 1234 MFU 12.3% eta 1m02s"
    assert format_console_line(1, 100, {"loss": 7.0}, None) == "step 1/100 loss 7.000"
    assert format_console_line(5, 9, {}, 7200.0) == "step 5/9 eta 2h00m"


def test_console_plain_lines_when_not_a_terminal():
    stream = io.StringIO()
    progress = ConsoleProgress(4, 0, enabled=True, log_every=2, stream=stream)
    assert not progress.live
    for step in range(1, 5):
        progress.update(step, {"loss": 8.0 - step})
    progress.print_line("saved")
    progress.close()
    lines = stream.getvalue().splitlines()
    assert [line.split(" eta")[0] for line in lines[:2]] == ["step 2/4 loss 6.000", "step 4/4 loss 4.000"]
    assert lines[1].endswith("eta 0s") and lines[2] == "saved"


def test_console_without_metric_lines_still_prints_messages():
    stream = io.StringIO()
    progress = ConsoleProgress(4, 0, enabled=True, log_every=1, stream=stream, lines=False)  # log_to_console: false
    for step in range(1, 5):
        progress.update(step, {"loss": 8.0 - step})
    progress.print_line("step 4: held-out loss 3.0")
    assert stream.getvalue().splitlines() == ["step 4: held-out loss 3.0"]


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_console_live_bar():
    stream = FakeTerminal()
    progress = ConsoleProgress(10, 2, enabled=True, stream=stream)
    assert progress.live
    progress.update(5, {"loss": 3.5, "tokens_per_second": 2000.0, "mfu": 0.5})
    progress.print_line("a message")
    progress.close()
    out = stream.getvalue()
    assert "5/10" in out and "loss=3.500" in out and "tok/s=2000" in out and "MFU=50.0%" in out
    assert "a message\n" in out
    assert not ConsoleProgress(10, 0, enabled=False, stream=FakeTerminal()).live


def tensorboard_scalars(logdir):
    """What TensorBoard shows for ``logdir``: its event files read in name order, and each
    ``SessionLog.START`` after the first one discards every event seen before it at its step or
    later (``plugin_event_accumulator._CheckForRestartAndMaybePurge``). {tag: [(step, value)]}."""
    shown, seen_start = [], False
    for path in sorted(logdir.iterdir()):
        for event in read_tfrecords(path):
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                if seen_start:
                    shown = [item for item in shown if item[0] < event.step]
                seen_start = True
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    shown.append((event.step, value.tag, value.simple_value))
    tags = {}
    for step, tag, value in shown:
        tags.setdefault(tag, []).append((step, value))
    return tags


def test_tensorboard_shows_a_resumed_run_once(tmp_path):
    """A run logs steps 1-10, dies, and resumes from its step-5 checkpoint in a new process (a
    new event file); later it rolls back from step 12 to a step-9 checkpoint within the process.
    TensorBoard shows every step once, with the values of the run that went on."""
    logdir = tmp_path / "tb"
    first = TensorBoardLogger(logdir)
    first.log_metrics(0, {"eval/loss": 11.0})
    for step in range(1, 11):
        first.log_metrics(step, {"train/loss": float(step)})
    first.close()  # no clean shutdown needed: every event is already in the file
    second = TensorBoardLogger(logdir)
    for step in [*range(6, 13), *range(10, 15)]:
        second.log_metrics(step, {"train/loss": 100.0 + step})
    second.close()
    expected = [(s, float(s)) for s in range(1, 6)] + [(s, 100.0 + s) for s in range(6, 15)]
    got = tensorboard_scalars(logdir)
    assert got["train/loss"] == expected and got["eval/loss"] == [(0, 11.0)]
    try:  # TensorBoard's own reader, where it is installed
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return
    accumulator = EventAccumulator(str(logdir))
    accumulator.Reload()
    assert [(e.step, e.value) for e in accumulator.Scalars("train/loss")] == expected


def test_tensorboard_resume_point_given(tmp_path):
    """A run that resumes at its last step (stopped before its final evaluation) names the first
    step it will train, so its evaluation at the resume step hides nothing logged before it."""
    logdir = tmp_path / "tb"
    first = TensorBoardLogger(logdir)
    for step in range(1, 5):
        first.log_metrics(step, {"train/loss": float(step)})
    first.close()
    second = TensorBoardLogger(logdir, purge_step=5)
    second.log_metrics(4, {"eval/loss": 2.0})
    second.close()
    got = tensorboard_scalars(logdir)
    assert got["train/loss"] == [(s, float(s)) for s in range(1, 5)] and got["eval/loss"] == [(4, 2.0)]


def test_jsonl_after_a_record_cut_short(tmp_path):
    """A process killed in mid-write leaves half a line; the next run's records must not be glued
    to it. Every line of the file parses as strict JSON and the whole records survive."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train/loss": 5.0}\n{"step": 2, "train/lo')
    logger = JSONLLogger(path)
    logger.log_metrics(2, {"train/loss": 4.0})
    logger.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["train/loss"]) for r in records] == [(1, 5.0), (2, 4.0)]
    with open(path, "a") as f:  # killed again, then a supervisor records the restart
        f.write('{"step": 3, "tra')
    append_jsonl(path, {"step": 2, "incident": "restart"})
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records[-1] == {"step": 2, "incident": "restart"} and len(records) == 3


def write_records(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def test_jsonl_drops_the_steps_after_a_resume_point(tmp_path):
    """Records of steps after the resume point go; text lines, records of earlier steps and the
    incidents of processes that did not survive (a restart, a hang) stay, in their order."""
    path = tmp_path / "metrics.jsonl"
    text = {"time": 1.0, "text": "started"}
    restart = {"step": 6, "incident": "restart", "attempt": 2}
    records = [text, *({"step": s, "train/loss": float(s)} for s in range(1, 7)),
               {"step": 5, "incident": "nonfinite"}, {"step": 6, "incident": "hang"}, restart]
    write_records(path, records)
    with open(path, "a") as f:
        f.write("not a record\n")
    assert drop_records_after(path, 6, keep=is_out_of_lineage) == 0  # nothing after step 6: left as it was
    assert drop_records_after(path, 3, keep=is_out_of_lineage) == 4
    lines = path.read_text().splitlines()
    assert lines[-1] == "not a record"
    assert [json.loads(line) for line in lines[:-1]] == [
        text, *({"step": s, "train/loss": float(s)} for s in range(1, 4)), {"step": 6, "incident": "hang"}, restart]
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]
    assert drop_records_after(tmp_path / "missing.jsonl", 3) == 0


def test_jsonl_rewrite_cut_short_loses_nothing(tmp_path, monkeypatch):
    """The file is rewritten under another name and renamed into place: a process killed before
    the rename leaves the whole file, and the next rewrite removes what it left beside it."""
    path = tmp_path / "metrics.jsonl"
    write_records(path, [{"step": s, "train/loss": float(s)} for s in range(1, 11)])
    before = path.read_bytes()
    leftover = temp_path(str(path)).replace(f"-{os.getpid()}-", "-999999-")  # another process's, killed
    shutil.copyfile(path, leftover)

    def killed(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            drop_records_after(path, 5)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]  # its own temporary file and the leftover
    logger = JSONLLogger(path)
    logger.log_metrics(11, {"train/loss": 11.0})
    assert logger.drop_after(5) == 6
    logger.log_metrics(6, {"train/loss": 60.0})  # appended to the rewritten file
    logger.close()
    assert [(r["step"], r["train/loss"]) for r in map(json.loads, path.read_text().splitlines())] == [
        *((s, float(s)) for s in range(1, 6)), (6, 60.0)]


def test_resumed_run_logs_each_step_once(tmp_path):
    """A run of 10 steps dies after step 10 before saving it and resumes from its checkpoint at
    step 5: metrics.jsonl then holds steps 1-10 once each, 6-10 as the resumed run logged them
    (the same numbers: the run is deterministic), token totals as the uninterrupted run's, and
    what the supervisor and the killed process left (a restart record, half a line)."""
    from test_token_accounting import finetune_config, fit, train_records

    cfg = finetune_config(tmp_path, max_duration="10ba", save_interval="5ba", autoresume=True,
                          save_folder=str(tmp_path / "checkpoints"))
    parts, first, before = fit(cfg)
    shutil.rmtree(tmp_path / "checkpoints" / "10")
    metrics = tmp_path / "run" / "metrics.jsonl"
    restart = {"step": 10, "time": time.time(), "incident": "restart", "exit": "killed by SIGKILL", "attempt": 1}
    append_jsonl(metrics, restart)
    with open(metrics, "a") as f:
        f.write('{"step": 11, "train/lo')  # a record cut short
    resumed_at = time.time()
    _, resumed, after = fit(cfg, parts)
    steps = [record["step"] for record in after if "train/loss" in record]
    assert steps == list(range(1, 11))
    old, new = train_records(before), train_records(after)
    assert [new[step] for step in range(1, 6)] == [old[step] for step in range(1, 6)]
    for step in range(6, 11):
        assert new[step]["time"] >= resumed_at
        for key in ("train/loss", "train/time/token"):
            assert new[step][key] == old[step][key], (step, key)
    assert restart in after
    assert resumed.tokens == first.tokens and resumed.incidents == {"restart": 1}

    # A crash before the first checkpoint: the run starts again at step 0 and logs each step once.
    shutil.rmtree(tmp_path / "checkpoints")
    early = {**restart, "step": 0, "attempt": 2}
    append_jsonl(metrics, early)
    _, again, records = fit(cfg)  # new parts: the first run donated the initial state
    steps = [record["step"] for record in records if "train/loss" in record]
    assert steps == list(range(1, 11))
    assert [train_records(records)[step]["train/loss"] for step in steps] == [old[step]["train/loss"] for step in steps]
    assert restart in records and early in records
    assert again.incidents == {"restart": 2}


def test_jsonl_is_strict_json_everywhere(tmp_path):
    """No NaN or Infinity literal anywhere in a record (strict parsers reject them), nested values
    and NumPy numbers included."""
    import numpy as np

    def reject(literal):
        raise ValueError(f"non-standard JSON literal {literal}")

    path = tmp_path / "metrics.jsonl"
    logger = JSONLLogger(path)
    logger.log_metrics(3, {"train/loss": float("nan"), "train/grad_norm": np.float32("inf")})
    logger.log_record(3, {"incident": "nan", "losses": [1.0, float("nan")], "detail": {"norm": float("-inf")},
                          "loss": np.float32(2.5), "step_count": np.int64(7)})
    logger.close()
    first, second = [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]
    assert first["train/loss"] is None and first["train/grad_norm"] is None
    assert second["losses"] == [1.0, None] and second["detail"] == {"norm": None}
    assert second["loss"] == 2.5 and second["step_count"] == 7


def test_tensorboard_log_dir_as_composer_names_it():
    """Composer's TensorboardLogger writes to ``{log_dir}/{run_name}``; without ``log_dir`` the
    run's own folder keeps its event files."""
    assert tensorboard_log_dir({"log_dir": "/mnt/tb"}, "runs/a", "a") == "/mnt/tb/a"
    assert tensorboard_log_dir({}, "runs/a", "a") == "runs/a/tensorboard"
    assert tensorboard_log_dir(None, "runs/a", "a") == "runs/a/tensorboard"
