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
    monkeypatch.setattr(multihost_utils, "process_allgather",
                        lambda x: np.stack([np.asarray(x), distributed.step_row(False, 0, [4, 4])]))
    last = {"a": {"input_ids": np.ones((2, 4), np.int32)}, "b": {"input_ids": np.ones((2, 4), np.int32)}}
    assert distributed.next_or_blank_on_every_process(mix, last) == (None, True)   # the other one goes on


class _Lengths:
    """Stands in for a data iterator in the separate length all-gather: its "batch" is its
    ``{path: T}`` and padding returns the lengths asked for."""

    def seq_lengths(self, batch):
        return dict(batch)

    def pad_seq_lengths(self, batch, lengths):
        return dict(lengths)


# per process: (signalled, data ended, {path: T} of its batch, None where it has none)
_STEPS = {
    "go on": [(False, False, {"a": 8, "b/x": 32, "b/y": 16}), (False, False, {"a": 16, "b/x": 8, "b/y": 16}),
              (False, False, {"a": 8, "b/x": 8, "b/y": 24})],
    "one signalled": [(False, False, {"a": 8}), (True, False, None), (False, False, {"a": 16})],
    "one ended": [(False, False, {"a": 8}), (False, False, {"a": 16}), (False, True, None)],
    "signalled and ended": [(False, True, None), (True, False, None), (False, False, {"a": 16})],
    "nothing to pad": [(False, False, {}), (False, False, {})],
    "all signalled": [(True, False, None), (True, False, None)],
}


@pytest.mark.parametrize("case", sorted(_STEPS))
def test_one_step_agreement_decides_as_the_three_separate_all_gathers(monkeypatch, case):
    """A training step's stop request, data end and sequence lengths travel in one int row per
    process (step_row) reduced by agree_step: its decisions equal those of the separate
    all-gathers any_process(signalled), any_process(ended) and same_seq_lengths (run here with
    their all-gather faked as these processes' values)."""
    import numpy as np
    from jax.experimental import multihost_utils
    procs = _STEPS[case]
    monkeypatch.setattr(distributed.jax, "process_count", lambda: len(procs))

    def separately(values):
        monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.stack([np.asarray(v) for v in values]))
    separately([s for s, _, _ in procs])
    stop = distributed.any_process(procs[0][0])
    separately([e for _, e, _ in procs])
    ended = distributed.any_process(procs[0][1])
    longest = None
    if not stop and not ended:
        keys = sorted(procs[0][2])
        separately([[t[k] for k in keys] for _, _, t in procs])
        longest = distributed.same_seq_lengths(_Lengths(), procs[0][2])
        longest = tuple(longest[k] for k in keys)

    rows = np.stack([distributed.step_row(s, e, [t[k] for k in sorted(t)] if t else ()) for s, e, t in procs])
    assert rows.shape == (len(procs), 3 + distributed.STEP_ROW_LENGTHS) and rows.dtype == np.int64
    assert distributed.agree_step(rows) == distributed.StepAgreement(stop, ended, longest)


def test_step_agreement_with_more_lengths_than_a_row_holds_or_mismatched_counts():
    """Lengths past STEP_ROW_LENGTHS do not fit: no agreed lengths (the caller gathers them
    apart). Processes whose batches have different numbers of lengths cannot be padded to one
    shape: every process raises the same error (before, their all-gather of differently
    shaped arrays failed)."""
    import numpy as np
    n = distributed.STEP_ROW_LENGTHS
    rows = np.stack([distributed.step_row(False, False, range(1, n + 2)),
                     distributed.step_row(False, False, [5] * (n + 1))])
    assert distributed.agree_step(rows) == distributed.StepAgreement(False, False, None)
    rows = np.stack([distributed.step_row(False, False, [8, 8]), distributed.step_row(False, False, [8])])
    with pytest.raises(ValueError, match=r"different numbers of sequence lengths .*\[2, 1\]"):
        distributed.agree_step(rows)
    rows[1, 0] = 1                   # a signalled process: all stop, the lengths do not matter
    assert distributed.agree_step(rows) == distributed.StepAgreement(True, False, None)


def test_lengths_that_do_not_fit_a_row_take_one_more_all_gather(monkeypatch):
    """A batch with more sequence lengths than a step row holds: the step's all-gather decides
    go on, a second one (same_seq_lengths) the lengths (the other process's faked)."""
    import numpy as np
    from jax.experimental import multihost_utils
    n = distributed.STEP_ROW_LENGTHS + 1
    keys = sorted(f"s{i:02d}" for i in range(n))
    mine, theirs = {k: 8 for k in keys}, {k: 8 + 8 * (i % 2) for i, k in enumerate(keys)}

    class Many(_Lengths):
        def __next__(self):
            return dict(mine)
    monkeypatch.setattr(distributed.jax, "process_count", lambda: 2)
    gathered = []

    def allgather(x):
        x = np.asarray(x)
        gathered.append(x)
        other = (distributed.step_row(False, False, [theirs[k] for k in keys]) if len(gathered) == 1
                 else np.asarray([theirs[k] for k in keys]))
        return np.stack([x, other])
    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    batch, ended, stop = distributed.next_step_on_every_process(Many())
    assert (ended, stop) == (False, False) and len(gathered) == 2
    assert batch == {k: max(mine[k], theirs[k]) for k in keys} and 16 in batch.values()


class _Feed:
    """A process's data: ``batches`` then the end; pads as the pipeline does (pad id 7)."""

    def __init__(self, *lengths):
        import numpy as np
        self.batches = [{"input_ids": np.ones((2, t), np.int32), "attention_mask": np.ones((2, t), np.int32)}
                        for t in lengths]
        self.fetched = 0

    def __next__(self):
        if self.fetched == len(self.batches):
            raise StopIteration
        self.fetched += 1
        return self.batches[self.fetched - 1]

    def seq_lengths(self, batch):
        from mllm_jax.data.pipeline import seq_lengths
        return seq_lengths(batch)

    def pad_seq_lengths(self, batch, lengths):
        from mllm_jax.data.pipeline import pad_seq_lengths
        return pad_seq_lengths(batch, lengths, 7)


def _fake_second_process(monkeypatch) -> tuple[list, dict]:
    """A 2-process run whose other process's all-gather row is ``other["row"]``; ``gathered``
    records this process's rows."""
    import numpy as np
    from jax.experimental import multihost_utils
    monkeypatch.setattr(distributed.jax, "process_count", lambda: 2)
    gathered, other = [], {}

    def allgather(x):
        gathered.append(np.asarray(x))
        return np.stack([np.asarray(x), other["row"]])
    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    return gathered, other


def test_next_step_on_every_process_is_one_all_gather(monkeypatch):
    """One step of a 2-process run (the other process's row faked): one all-gather gives the
    padded batch, the data end and the stop request; a signalled process fetches nothing."""
    gathered, other = _fake_second_process(monkeypatch)

    feed = _Feed(8, 8)
    other["row"] = distributed.step_row(False, False, [16])
    batch, ended, stop = distributed.next_step_on_every_process(feed)
    assert len(gathered) == 1 and (ended, stop) == (False, False)
    assert batch["input_ids"].shape == (2, 16) and (batch["input_ids"][:, 8:] == 7).all()
    assert (batch["attention_mask"][:, 8:] == 0).all()

    other["row"] = distributed.step_row(True, False)          # the other process was signalled
    batch, ended, stop = distributed.next_step_on_every_process(feed)
    assert len(gathered) == 2 and (ended, stop) == (False, True) and batch["input_ids"].shape == (2, 8)

    other["row"] = distributed.step_row(False, False, [8])
    batch, ended, stop = distributed.next_step_on_every_process(feed, True)   # this one was signalled: no fetch
    assert len(gathered) == 3 and feed.fetched == 2 and (batch, ended, stop) == (None, False, True)
    assert gathered[-1][:3].tolist() == [1, 0, 0]

    batch, ended, stop = distributed.next_step_on_every_process(feed)        # this one's data ended
    assert len(gathered) == 4 and (batch, ended, stop) == (None, True, False)
    assert gathered[-1][:3].tolist() == [0, 1, 0]

    other["row"] = distributed.step_row(False, False)
    batch, ended, stop = distributed.next_step_on_every_process(feed, fetch=False)   # after the last step
    assert len(gathered) == 5 and (batch, ended, stop) == (None, False, False)


def test_fit_agrees_once_per_step(tmp_path, monkeypatch):
    """fit's only per-step agreement is next_step_on_every_process: once before step 1 and once
    after each step (after the last with nothing fetched); any_process (the separate stop / data
    end agreements it replaced) is never called."""
    from tests.toy import fit_toy, tiny_experiment
    calls = []
    real = distributed.next_step_on_every_process

    def recording(it, stop=False, *, fetch=True):
        calls.append((stop, fetch))
        return real(it, stop, fetch=fetch)
    monkeypatch.setattr(distributed, "next_step_on_every_process", recording)
    monkeypatch.setattr(distributed, "any_process", lambda flag: pytest.fail("a separate agreement"))
    res = fit_toy(tiny_experiment(**{"train.steps": 3, "train.run_dir": str(tmp_path / "r")}))
    assert res.status == "completed" and [h["step"] for h in res.history] == [1, 2, 3]
    assert calls == [(False, True), (False, True), (False, True), (False, False)]


def test_an_eval_step_is_one_all_gather_and_blanks_take_the_agreed_lengths(monkeypatch):
    """Eval in a 2-process run (the other process's row faked): while the other goes on, a
    process whose data ended feeds blank rows padded to the other's longer length, with one
    all-gather per step (there were two: the codes, then the lengths); all stop together once
    every process ended, or at once when one cannot feed blanks (code 2)."""
    gathered, other = _fake_second_process(monkeypatch)

    class Ended(_Lengths):
        def __next__(self):
            raise StopIteration

        def blank_like(self, batch):
            return {k: 0 * v + 8 for k, v in batch.items()}        # blank rows: length 8 here

    other["row"] = distributed.step_row(False, 0, [16])            # the other goes on, 16 long
    batch, done = distributed.next_or_blank_on_every_process(Ended(), {"a": 4})
    assert (batch, done) == ({"a": 16}, False) and len(gathered) == 1
    assert gathered[0][:4].tolist() == [0, 1, 1, 8]                # code 1, one length: the blank's
    other["row"] = distributed.step_row(False, 1, [8])             # both ended
    assert distributed.next_or_blank_on_every_process(Ended(), {"a": 4}) == (None, True) and len(gathered) == 2
    other["row"] = distributed.step_row(False, 0, [16])            # this one cannot blank: all stop
    assert distributed.next_or_blank_on_every_process(Ended(), None) == (None, True)
    assert gathered[-1][:3].tolist() == [0, 2, 0] and len(gathered) == 3
