"""Queries of death (attrserve_service/quarantine.py): the table, the fingerprint, and the front end's rules around a
death with a fake engine process (EngineProcess with a fake transport: what it sends is read back from its frames).
The served tests, with a model that kills its engine process, are in test_engine_process.py."""

from __future__ import annotations

import asyncio
import dataclasses
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from test_engine_process import Transport

from attrserve_engine import AlgorithmSpec, AttributionJob, EngineObserver
from attrserve_engine.errors import FailedPrecondition, Unavailable
from attrserve_service import engine_process
from attrserve_service import quarantine as quarantine_module
from attrserve_service.config import ServerConfig
from attrserve_service.engine_process import EngineLost, EngineProcess
from attrserve_service.frames import decode
from attrserve_service.quarantine import Board, Quarantine, fingerprint


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def job(value: float = 1.0, **changes: Any) -> AttributionJob:
    return dataclasses.replace(
        AttributionJob(model="m", algorithm="saliency", inputs=(np.full((1, 4), value, np.float32),), target=0), **changes
    )


def test_a_fingerprint_is_what_the_engine_computes_from_not_what_a_retry_changes() -> None:
    key = fingerprint(job())
    # A retry: another request id, deadline, arrival or priority.
    assert fingerprint(job(request_id="retry-2", deadline=12.5, arrival=3.0, priority="batch")) == key
    # Anything the engine computes from is another request.
    others = [
        job(2.0),
        job(inputs=(np.full((1, 4), 1.0, np.float64),)),
        job(inputs=(np.full((2, 2), 1.0, np.float32),)),
        job(target=1),
        job(algorithm="integrated_gradients"),
        job(model="n"),
        job(model_version="2"),
        job(params={"abs": False}),
        job(seed=7),
        job(baselines=(0.5,)),
        job(also=(AlgorithmSpec("integrated_gradients"),)),
    ]
    keys = {fingerprint(other) for other in others}
    assert key not in keys and len(keys) == len(others)


def test_suspects_and_quarantined_fingerprints_expire_and_each_table_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    table = Quarantine(60.0, clock)
    assert not table.watching
    table.suspect(b"a")
    assert table.watching and table.suspected(b"a") and table.refusal(b"a", "m", "saliency") is None
    table.clear(b"a")
    assert not table.suspected(b"a") and not table.watching

    table.suspect(b"b")
    table.quarantine(b"b", "the engine process 7 exited (exit code 13)")
    assert not table.suspected(b"b")
    refusal = table.refusal(b"b", "m", "saliency")
    assert isinstance(refusal, FailedPrecondition) and refusal.code == "FAILED_PRECONDITION"
    assert all(part in str(refusal) for part in ("'m'", "'saliency'", "query of death", "exit code 13", "60 s", "--quarantine-seconds"))
    clock.now += 30
    assert "30 s more" in str(table.refusal(b"b", "m", "saliency"))
    table.suspect(b"c")
    clock.now += 30.5  # b's 60 s are over, c has 29.5 s left
    assert table.refusal(b"b", "m", "saliency") is None and table.suspected(b"c")
    clock.now += 30
    assert not table.watching  # every entry expired: the request path no longer fingerprints

    monkeypatch.setattr(quarantine_module, "CAPACITY", 3)
    for key in (b"1", b"2", b"3", b"4"):
        table.suspect(key)
        table.quarantine(key + b"q", "why")
    assert [table.suspected(k) for k in (b"1", b"2", b"3", b"4")] == [False, True, True, True]
    assert [table.refusal(k + b"q", "m", "a") is None for k in (b"1", b"2", b"3", b"4")] == [True, False, False, False]

    off = Quarantine(0.0, clock)
    off.suspect(b"a")
    assert not off.enabled and not off.watching and not off.suspected(b"a")


class Heard(EngineObserver):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def suspect_probed(self, model: str, outcome: str) -> None:
        self.events.append(("suspect_probed", model, outcome))

    def request_refused(self, model: str, reason: str) -> None:
        self.events.append(("request_refused", model, reason))


def fake_front(quarantine_seconds: float = 600.0) -> tuple[EngineProcess, Heard]:
    engine = EngineProcess(ServerConfig(port=0, busy_poll_us=0, quarantine_seconds=quarantine_seconds))
    engine._loop, engine._writer, engine.up = asyncio.get_running_loop(), Transport(), True
    engine._snapshot = dataclasses.replace(engine._snapshot, names=frozenset({"m"}), algorithms=frozenset({"saliency"}))
    heard = Heard()
    engine.watch(heard)
    return engine, heard


def sent(engine: EngineProcess) -> list[tuple]:
    """The submits the front has written so far: (key, the job's input value)."""
    assert isinstance(engine._writer, Transport)
    messages = [m for frame in engine._writer.frames for m in decode(bytearray(frame[8:]), tensors=False)]
    return [(m[1], float(m[2].inputs[0].flat[0])) for m in messages if m[0] == "submit"]


def answer(engine: EngineProcess, key: int) -> None:
    engine._pending.pop(key).set_result(f"answer {key}")


def die(engine: EngineProcess, computing: frozenset[int] | None = None, code: int = 13) -> None:
    """The engine process dies (as its reaper reports it, with exit status `code`: -9 is SIGKILL) while the requests
    `computing` were in its passes (None: its board cannot say), and a new one serves at once."""
    engine._board = types.SimpleNamespace(computing=lambda: computing, close=lambda: None)  # type: ignore[assignment]
    engine._lost(types.SimpleNamespace(pid=7), code, was_up=False)
    engine.up = True


async def turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def lost_in_a_death(engine: EngineProcess, value: float) -> None:
    """A request of `value` is in flight when the engine process dies (its board cannot say who computed: a suspect)."""
    request = asyncio.ensure_future(engine.attribute(job(value)))
    await turns()
    die(engine)
    with pytest.raises(EngineLost):
        await request


def test_after_a_death_a_suspect_runs_alone_and_the_others_wait_for_it() -> None:
    async def scenario() -> None:
        engine, heard = fake_front()
        a, b = asyncio.ensure_future(engine.attribute(job(1.0))), asyncio.ensure_future(engine.attribute(job(2.0)))
        await turns()
        die(engine)
        for request in (a, b):
            with pytest.raises(EngineLost, match="exit code 13.*may be retried") as lost:
                await request
            assert lost.value.code == "UNAVAILABLE"
        assert engine._quarantine.suspected(fingerprint(job(1.0))) and engine._quarantine.suspected(fingerprint(job(2.0)))

        # An innocent request is in flight; suspect 1.0 is sent again: it waits until that one is answered, and a
        # request that comes meanwhile waits until the suspect is answered.
        before = len(sent(engine))
        innocent = asyncio.ensure_future(engine.attribute(job(3.0)))
        await turns()
        probe = asyncio.ensure_future(engine.attribute(job(1.0, request_id="retry")))
        await turns()
        later = asyncio.ensure_future(engine.attribute(job(4.0)))
        await turns()
        assert [value for _, value in sent(engine)[before:]] == [3.0]
        answer(engine, sent(engine)[-1][0])
        await asyncio.sleep(0.02)  # the probe looks every millisecond
        assert [value for _, value in sent(engine)[before:]] == [3.0, 1.0]
        assert not later.done()
        answer(engine, sent(engine)[-1][0])
        await turns()
        assert [value for _, value in sent(engine)[before:]] == [3.0, 1.0, 4.0]
        answer(engine, sent(engine)[-1][0])
        assert [await innocent, await probe, await later] == ["answer 2", "answer 3", "answer 4"]
        assert not engine._quarantine.suspected(fingerprint(job(1.0)))
        assert heard.events == [("suspect_probed", "m", "served")]

        # Suspect 2.0 answered with an error: the engine process lived, so it is cleared too.
        probe = asyncio.ensure_future(engine.attribute(job(2.0)))
        await turns()
        key = sent(engine)[-1][0]
        engine._pending.pop(key).set_exception(FailedPrecondition("not this way"))
        with pytest.raises(FailedPrecondition, match="not this way"):
            await probe
        assert not engine._quarantine.watching  # nothing left: requests are not fingerprinted any more
        assert heard.events[-1] == ("suspect_probed", "m", "served")

    asyncio.run(scenario())


def test_a_suspect_that_kills_the_engine_process_when_alone_is_quarantined_and_identical_requests_are_refused() -> None:
    async def scenario() -> None:
        engine, heard = fake_front()
        await lost_in_a_death(engine, 1234.0)
        retry = asyncio.ensure_future(engine.attribute(job(1234.0, request_id="retry")))
        await turns()
        die(engine)
        with pytest.raises(FailedPrecondition, match="query of death.*exit code 13") as quarantined:
            await retry
        assert quarantined.value.code == "FAILED_PRECONDITION"
        assert heard.events == [("suspect_probed", "m", "quarantined")]
        count = len(sent(engine))
        for again in (job(1234.0, request_id="third"), job(1234.0, priority="batch")):
            with pytest.raises(FailedPrecondition, match="quarantined"):
                await engine.attribute(again)
        assert len(sent(engine)) == count, "a quarantined request reached the engine"
        assert heard.events[1:] == [("request_refused", "m", "quarantined")] * 2
        # Other requests are served as ever.
        other = asyncio.ensure_future(engine.attribute(job(5.0)))
        await turns()
        answer(engine, sent(engine)[-1][0])
        assert await other == f"answer {sent(engine)[-1][0]}"

    asyncio.run(scenario())


def test_a_suspect_killed_from_outside_while_alone_stays_a_suspect_until_a_second_such_kill(monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGKILL that neither the front nor the OOM killer sent (an operator's) while a suspect runs alone proves nothing
    the first time: bench/chaos.py saw a `good` request that had merely been in flight quarantined for 600 s by one, and
    every identical request refused. It stays a suspect; a second such kill quarantines it. An OOM kill, the front's own
    kill (its heartbeat), or any other death quarantines it at once, as before."""
    ooms = [5]
    monkeypatch.setattr(engine_process, "oom_kills", lambda: ooms[0])

    async def probe_dies(engine: EngineProcess, value: float, code: int, meanwhile: Callable[[], Any] = lambda: None) -> BaseException:
        """The suspect of `value`, sent again, runs alone; `meanwhile` happens, and the engine process dies with `code`."""
        request = asyncio.ensure_future(engine.attribute(job(value, request_id="again")))
        await turns()
        assert sent(engine)[-1][1] == value and engine._probing  # it runs alone
        meanwhile()
        die(engine, code=code)
        with pytest.raises((Unavailable, FailedPrecondition)) as failed:
            await request
        return failed.value

    async def scenario() -> None:
        engine, heard = fake_front()
        await lost_in_a_death(engine, 1.0)
        first = await probe_dies(engine, 1.0, -9)
        assert isinstance(first, EngineLost) and not isinstance(first, FailedPrecondition) and "killed by SIGKILL" in first.why
        assert engine._quarantine.suspected(fingerprint(job(1.0))) and heard.events == []
        second = await probe_dies(engine, 1.0, -9)
        assert isinstance(second, FailedPrecondition) and "killed by SIGKILL" in str(second)
        assert heard.events == [("suspect_probed", "m", "quarantined")]

        # Killed by the OOM killer (its count grew): the suspect did it, at once.
        await lost_in_a_death(engine, 2.0)
        assert isinstance(await probe_dies(engine, 2.0, -9, meanwhile=lambda: ooms.append(ooms.pop() + 1)), FailedPrecondition)
        # Killed by the front's heartbeat (the suspect held the GIL): at once.
        await lost_in_a_death(engine, 3.0)
        killed = lambda: setattr(engine, "_killed_why", "the engine process 7 did not answer for 60 s (stuck_pass_seconds)")  # noqa: E731
        assert isinstance(await probe_dies(engine, 3.0, -9, meanwhile=killed), FailedPrecondition)
        # Where the OOM kills cannot be read, a SIGKILL quarantines at once, as before.
        monkeypatch.setattr(engine_process, "oom_kills", lambda: None)
        await lost_in_a_death(engine, 4.0)
        assert isinstance(await probe_dies(engine, 4.0, -9), FailedPrecondition)
        # A suspect killed from outside once and then answered is cleared.
        monkeypatch.setattr(engine_process, "oom_kills", lambda: ooms[0])
        await lost_in_a_death(engine, 5.0)
        await probe_dies(engine, 5.0, -9)
        request = asyncio.ensure_future(engine.attribute(job(5.0)))
        await turns()
        answer(engine, sent(engine)[-1][0])
        assert (await request).startswith("answer") and not engine._quarantine.suspected(fingerprint(job(5.0)))

    asyncio.run(scenario())


def test_a_cancelled_probe_or_an_engine_down_leaves_a_suspect_and_lets_the_others_go() -> None:
    async def scenario() -> None:
        engine, heard = fake_front()
        await lost_in_a_death(engine, 1.0)
        # The caller of the probe gives up: the others go, and it stays a suspect. (One waiting behind it that gives up
        # is never sent.)
        probe = asyncio.ensure_future(engine.attribute(job(1.0)))
        await turns()
        waiting = asyncio.ensure_future(engine.attribute(job(2.0)))
        leaves = asyncio.ensure_future(engine.attribute(job(7.0)))
        await turns()
        leaves.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaves
        probe.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probe
        await turns()
        assert [value for _, value in sent(engine)[-2:]] == [1.0, 2.0] and not engine._probing
        answer(engine, sent(engine)[-1][0])
        assert (await waiting).startswith("answer")
        assert engine._quarantine.suspected(fingerprint(job(1.0)))
        # A request that cannot be pickled (so not fingerprinted either) fails alone, as it always did.
        with pytest.raises(Exception, match="pickle"):
            await engine.attribute(job(params={"abs": lambda: 0}))
        # Sent while the engine process is down: refused with UNAVAILABLE, still a suspect, not quarantined.
        engine.up = False
        with pytest.raises(Unavailable) as down:
            await engine.attribute(job(1.0))
        assert not isinstance(down.value, EngineLost) and not isinstance(down.value, FailedPrecondition)
        assert engine._quarantine.suspected(fingerprint(job(1.0))) and heard.events == []
        # Requests in flight when the server shuts down are not suspects.
        engine.up = True
        engine._quarantine.clear(fingerprint(job(1.0)))
        last = asyncio.ensure_future(engine.attribute(job(3.0)))
        await turns()
        engine._closing = True
        die(engine)
        with pytest.raises(Unavailable) as closing:
            await last
        assert not isinstance(closing.value, EngineLost) and not engine._quarantine.watching

    asyncio.run(scenario())


def test_with_the_quarantine_off_a_death_leaves_no_suspects() -> None:
    async def scenario() -> None:
        engine, heard = fake_front(quarantine_seconds=0)
        await lost_in_a_death(engine, 1234.0)
        assert not engine._quarantine.watching
        again = asyncio.ensure_future(engine.attribute(job(1234.0)))
        other = asyncio.ensure_future(engine.attribute(job(2.0)))
        await turns()
        assert [value for _, value in sent(engine)[-2:]] == [1234.0, 2.0]  # both sent at once: nothing runs alone
        die(engine)
        for request in (again, other):
            with pytest.raises(EngineLost):
                await request
        assert heard.events == []

    asyncio.run(scenario())


def test_a_kill_while_a_load_ran_and_no_pass_did_blames_the_load_not_the_requests_in_flight() -> None:
    """The front's heartbeat killed an engine process whose event loop a load held (the load is skipped from then on):
    no pass ran, so the board cannot say who computed, but no request is to blame. They are not suspects, and are not
    run alone when sent again. Where a pass did run, its requests are suspects as after any death."""

    async def scenario() -> None:
        engine, heard = fake_front()
        request = asyncio.ensure_future(engine.attribute(job(3.0)))
        await turns()
        engine._killed_why, engine._killed_in_load = "killed while it loaded m v1", True
        die(engine)  # the board cannot say (None)
        with pytest.raises(EngineLost, match="killed while it loaded m v1"):
            await request
        assert not engine._quarantine.watching
        again = asyncio.ensure_future(engine.attribute(job(3.0)))
        other = asyncio.ensure_future(engine.attribute(job(4.0)))
        await turns()
        assert [value for _, value in sent(engine)[-2:]] == [3.0, 4.0]  # both at once: nothing runs alone
        for key, _ in sent(engine)[-2:]:
            answer(engine, key)
        assert await again == f"answer {sent(engine)[-2][0]}" and heard.events == []

        request = asyncio.ensure_future(engine.attribute(job(5.0)))
        await turns()
        ((key, _),) = sent(engine)[-1:]
        engine._killed_why, engine._killed_in_load = "killed while it loaded m v1", True
        die(engine, computing=frozenset({key}))  # a pass ran that request: it is a suspect
        with pytest.raises(EngineLost):
            await request
        assert engine._quarantine.watching
        assert not engine._killed_in_load  # each death reads it once

    asyncio.run(scenario())


def test_the_board_says_which_requests_each_worker_computes_and_when_it_cannot_say() -> None:
    board = Board.create()
    assert board is not None
    engine_side = Board(board.fd)  # the engine process maps the same memory (here: a second map in this process)
    try:
        assert board.computing() is None  # nothing running: the death came from elsewhere
        engine_side.running(("cpu", 0), [3, 5])
        engine_side.running(("cuda:0", 0), [8])
        assert board.computing() == {3, 5, 8}
        engine_side.running(("cpu", 0), [])
        assert board.computing() == {8}
        engine_side.running(("cuda:0", 0), list(range(Board.SLOT_WORDS)))  # more than a slot holds
        assert board.computing() is None
        engine_side.running(("cuda:0", 0), [9])
        assert board.computing() == {9}
        for worker in range(1, Board.SLOTS - 1):  # every slot taken ...
            engine_side.running(("cpu", worker), [])
        assert board.computing() == {9}
        engine_side.running(("cpu", Board.SLOTS), [1])  # ... one worker more has none: the board cannot say any more
        assert board.computing() is None
        engine_side.running(("cpu", 0), [3])  # whatever the others write
        assert board.computing() is None
    finally:
        engine_side.close()
        board.close()


def test_only_the_requests_computing_at_a_death_are_suspects() -> None:
    async def scenario() -> None:
        engine, heard = fake_front()
        computing, queued = asyncio.ensure_future(engine.attribute(job(1.0))), asyncio.ensure_future(engine.attribute(job(2.0)))
        await turns()
        die(engine, computing=frozenset({sent(engine)[0][0]}))
        for request in (computing, queued):
            with pytest.raises(EngineLost):
                await request
        assert engine._quarantine.suspected(fingerprint(job(1.0))) and not engine._quarantine.suspected(fingerprint(job(2.0)))
        # A death during a probe that the board does not pin on the probe (what computed was not the front's: a
        # request whose caller left) leaves it a suspect, not quarantined.
        probe = asyncio.ensure_future(engine.attribute(job(1.0)))
        await turns()
        die(engine, computing=frozenset({999}))
        with pytest.raises(EngineLost):
            await probe
        assert engine._quarantine.suspected(fingerprint(job(1.0))) and heard.events == []
        probe = asyncio.ensure_future(engine.attribute(job(1.0)))
        await turns()
        die(engine, computing=frozenset({sent(engine)[-1][0]}))
        with pytest.raises(FailedPrecondition):
            await probe
        assert heard.events == [("suspect_probed", "m", "quarantined")]

    asyncio.run(scenario())


def test_a_suspect_that_cannot_run_alone_in_time_runs_with_the_others_and_its_answer_clears_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A request in flight that is never answered (a pass stuck with the watchdog off) must not hold every other
    request back behind a probe for ever: after _PROBE_WAIT_S the suspect runs with the others."""
    monkeypatch.setattr(engine_process, "_PROBE_WAIT_S", 0.05)

    async def scenario() -> None:
        engine, heard = fake_front()
        await lost_in_a_death(engine, 1.0)
        stuck = asyncio.ensure_future(engine.attribute(job(2.0)))  # never answered
        await turns()
        probe = asyncio.ensure_future(engine.attribute(job(1.0)))
        await turns()
        other = asyncio.ensure_future(engine.attribute(job(3.0)))
        await turns()
        assert [value for _, value in sent(engine)[-1:]] == [2.0]
        await asyncio.sleep(0.2)
        assert [value for _, value in sent(engine)[-3:]] == [2.0, 1.0, 3.0] and not engine._probing
        answer(engine, sent(engine)[-2][0])
        answer(engine, sent(engine)[-1][0])
        assert (await probe).startswith("answer") and (await other).startswith("answer")
        assert not engine._quarantine.suspected(fingerprint(job(1.0))) and heard.events == []  # answered: cleared, not counted
        stuck.cancel()

    asyncio.run(scenario())


def test_a_probe_that_gave_up_waiting_does_not_end_a_later_suspects_run_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A probe that could not run alone in time runs with the others and lets them go; a second suspect's probe may
    then hold everything back. The first one's end let go of that too: plain requests went out beside the second
    suspect, and a death then quarantined it for what they did. Only the probe that holds the others back lets them go."""
    monkeypatch.setattr(engine_process, "_PROBE_WAIT_S", 0.05)

    async def scenario() -> None:
        engine, heard = fake_front()
        await lost_in_a_death(engine, 1.0)
        await lost_in_a_death(engine, 2.0)
        stuck = asyncio.ensure_future(engine.attribute(job(9.0)))  # in flight, unanswered for now (a long pass)
        await turns()
        first = asyncio.ensure_future(engine.attribute(job(1.0)))  # gives up waiting, runs with 9.0
        await asyncio.sleep(0.2)
        assert [value for _, value in sent(engine)[-2:]] == [9.0, 1.0] and not engine._probing
        second = asyncio.ensure_future(engine.attribute(job(2.0)))  # a probe of its own: waits for 9.0 and 1.0
        await turns()
        assert engine._probing
        answer(engine, sent(engine)[-1][0])  # 1.0 is answered: its probe ends, and must not let the others go
        assert (await first).startswith("answer")
        plain = asyncio.ensure_future(engine.attribute(job(3.0)))
        await asyncio.sleep(0.02)
        assert engine._probing and [value for _, value in sent(engine)[-2:]] == [9.0, 1.0]  # 3.0 waits behind 2.0
        answer(engine, sent(engine)[-2][0])  # 9.0 is answered: 2.0 runs alone
        await asyncio.sleep(0.02)
        assert [value for _, value in sent(engine)[-3:]] == [9.0, 1.0, 2.0] and not plain.done()
        die(engine)  # while 2.0 ran alone: it did it
        with pytest.raises(FailedPrecondition, match="query of death"):
            await second
        assert heard.events == [("suspect_probed", "m", "quarantined")]
        await asyncio.sleep(0.02)  # the others go again
        assert sent(engine)[-1][1] == 3.0 and not engine._probing
        answer(engine, sent(engine)[-1][0])
        assert (await plain).startswith("answer") and (await stuck).startswith("answer")
        assert not engine._quarantine.suspected(fingerprint(job(3.0))) and not engine._quarantine.suspected(fingerprint(job(1.0)))

    asyncio.run(scenario())
