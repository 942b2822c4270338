"""``distributed.initialize``: which environments start ``jax.distributed`` by themselves.

``jax.distributed.initialize`` is replaced by a recorder: nothing here starts a coordinator."""
import pytest

from mllm_jax.train import distributed

_ALL = distributed._SLURM_ENV + (distributed._OMPI_ENV, "OMPI_COMM_WORLD_SIZE") + distributed._TPU_ENV + (
    distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID)
_SRUN = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "node[001-002]", "SLURM_NTASKS": "2",
         "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}


@pytest.fixture
def calls(monkeypatch):
    for k in _ALL:
        monkeypatch.delenv(k, raising=False)
    made = []
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda *a, **kw: made.append((a, kw)))
    monkeypatch.setattr(distributed.jax.config, "update", lambda *a: None)
    return made


@pytest.mark.parametrize("env", [
    {},
    {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1"},     # salloc / sbatch shell: no srun step
    dict(_SRUN, SLURM_NTASKS="1"),                       # a one-task srun step
    {"OMPI_COMM_WORLD_SIZE": "4"},                       # Open MPI without ORTE: JAX cannot find it
    {distributed._OMPI_ENV: "123.0;tcp://10.0.0.1:5000", "OMPI_COMM_WORLD_SIZE": "1"},
])
def test_single_process_environments_do_not_start_jax_distributed(calls, monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert distributed.detected_launcher() is None
    assert distributed.initialize() is False and calls == []


@pytest.mark.parametrize("env,name", [
    (_SRUN, "slurm"),
    ({distributed._OMPI_ENV: "123.0;tcp://10.0.0.1:5000", "OMPI_COMM_WORLD_SIZE": "4"}, "openmpi"),
    ({"TPU_WORKER_HOSTNAMES": "t1,t2"}, "tpu"),
])
def test_multi_process_launchers_start_jax_distributed_with_discovery(calls, monkeypatch, env, name):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert distributed.detected_launcher() == name
    assert distributed.initialize() is True and calls == [((), {})]


def test_explicit_coordinator_wins_and_must_be_complete(calls, monkeypatch):
    for k, v in _SRUN.items():
        monkeypatch.setenv(k, v)
    assert distributed.initialize("10.0.0.1:1234", 2, 0) is True
    assert calls == [(("10.0.0.1:1234",), {"num_processes": 2, "process_id": 0})]
    with pytest.raises(ValueError, match="process id"):
        distributed.initialize("10.0.0.1:1234", 2)


def test_processes_agree_on_the_longest_sequence_length(monkeypatch):
    """Each process's pipeline picks its own bucket; before the rows become one global array all
    take the longest one any process has (one all-gather, faked here: the other process's
    lengths), per stream and view, padding with the iterator's own rule."""
    import numpy as np
    from jax.experimental import multihost_utils
    from mllm_jax.data.mixture import MixtureIterator
    from mllm_jax.data.pipeline import DataIterator

    def batch(t):
        return {"input_ids": np.ones((2, t), np.int32), "attention_mask": np.ones((2, t), np.int32),
                "positions": np.tile(np.arange(t, dtype=np.int32), (2, 1)), "image_mask": np.ones((2, 3), bool)}
    other = {}
    monkeypatch.setattr(multihost_utils, "process_allgather",
                        lambda x: np.stack([x, np.asarray([other[k] for k in sorted(other)])]))
    stream = DataIterator(lambda epoch: iter(()), num_epochs=1, batch_size=2, drop_remainder=True,
                          max_skip_fraction=0.0, pad_id=7)
    mix = MixtureIterator({"pairs": stream, "views": stream})
    mine = {"pairs": batch(8), "views": {"image": batch(16), "text": batch(8)}}
    other.update({"pairs": 16, "views/image": 8, "views/text": 8})
    out = distributed.same_seq_lengths(mix, mine)
    assert mix.seq_lengths(out) == {"pairs": 16, "views/image": 16, "views/text": 8}
    p = out["pairs"]
    assert (p["input_ids"][:, 8:] == 7).all() and (p["attention_mask"][:, 8:] == 0).all()
    assert (p["positions"][:, 8:] == 7).all() and p["image_mask"].shape == (2, 3)
    assert out["views"]["image"] is mine["views"]["image"] and out["views"]["text"] is mine["views"]["text"]
    other.update({"pairs": 8, "views/image": 16, "views/text": 8})
    assert distributed.same_seq_lengths(mix, mine) is mine       # already the longest everywhere


def test_a_mixture_with_a_stream_that_cannot_blank_stops_eval_everywhere(monkeypatch):
    """MixtureIterator.blank_like existed whatever its streams: a process whose mixture ended
    (code 1: 'can feed blanks') then called a stream's missing blank_like and failed alone while
    the others waited in the next all-gather. Such a mixture has no blank_like: all stop."""
    import numpy as np
    from jax.experimental import multihost_utils
    from mllm_jax.data.mixture import MixtureIterator
    from mllm_jax.data.pipeline import DataIterator

    stream = DataIterator(lambda epoch: iter(()), num_epochs=1, batch_size=2, drop_remainder=True,
                          max_skip_fraction=0.0)
    assert hasattr(MixtureIterator({"a": stream, "b": stream}), "blank_like")
    class Ended:                      # an ended stream that can blank
        def __next__(self):
            raise StopIteration

        def blank_like(self, batch):
            return batch
    mix = MixtureIterator({"a": Ended(), "b": iter(())})         # b: a plain iterator
    assert not hasattr(mix, "blank_like")
    monkeypatch.setattr(distributed.jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.stack([np.asarray(x), np.int32(0)]))
    last = {"a": {"input_ids": np.ones((2, 4), np.int32)}, "b": {"input_ids": np.ones((2, 4), np.int32)}}
    assert distributed.next_or_blank_on_every_process(mix, last) == (None, True)   # the other one goes on
