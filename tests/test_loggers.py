"""JSONL and TensorBoard files read back, and the console's plain and live output."""

import io
import json
import struct

import pytest
from tensorboardX.proto import event_pb2

from jaxtrain.metrics.loggers import ConsoleProgress, JSONLLogger, TensorBoardLogger, format_console_line


def read_tfrecords(path):
    """Event protos from a TFRecord file: [u64 length][u32 crc][data][u32 crc] per record."""
    events, data = [], path.read_bytes()
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        offset += 12
        event = event_pb2.Event()
        event.ParseFromString(data[offset : offset + length])
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
    logger.close()
    (event_file,) = (tmp_path / "tb").iterdir()
    scalars = [
        (event.step, value.tag, value.simple_value)
        for event in read_tfrecords(event_file)
        for value in event.summary.value
    ]
    assert (1, "train/loss", 5.5) in scalars and (2, "train/loss", 4.25) in scalars
    assert any(step == 2 and tag == "train/lr" and v == pytest.approx(1e-3) for step, tag, v in scalars)


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
