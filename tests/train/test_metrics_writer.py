"""MetricsWriter on resume: the steps after the restored one are logged once (JSONL and TensorBoard)."""
import json
import struct

from tensorboardX.proto.event_pb2 import Event

from mllm_jax.train.metrics import MetricsWriter


def _events(run):
    """The Event records of the run's TensorBoard files (TFRecord: length, crc, data, crc)."""
    out = []
    for f in sorted((run / "tensorboard").glob("events.*")):
        buf, i = f.read_bytes(), 0
        while i < len(buf):
            (n,) = struct.unpack("<Q", buf[i:i + 8])
            out.append(Event.FromString(buf[i + 12:i + 12 + n]))
            i += 12 + n + 4
    return out


def test_resume_drops_the_steps_after_the_restored_one(tmp_path):
    w = MetricsWriter(tmp_path)
    for s in range(1, 6):
        w.write(s, {"loss": float(s)})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')                   # cut short by a kill
    w = MetricsWriter(tmp_path, resume_step=3)      # the checkpoint restored holds step 3
    w.write(4, {"loss": 40.0})
    w.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    # TensorBoard: the resumed writer's file starts with a session START at step 4, which makes
    # TensorBoard discard the earlier file's events from step 4 on
    purges = [e.step for e in _events(tmp_path) if e.HasField("session_log") and e.session_log.status == 1]
    assert purges == [4]


def test_a_fresh_writer_appends(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 7, "loss": 1.0}\n')
    w = MetricsWriter(tmp_path, tensorboard=False)
    w.write(8, {"loss": 2.0})
    w.close()
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [7, 8]
