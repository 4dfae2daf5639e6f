"""The pause points' protocol: inert unless armed, one pause per trigger file, release by file."""
import asyncio
import threading

import pytest

from worker import pause_points


def test_unknown_points_and_a_missing_directory_are_refused(tmp_path):
    assert pause_points._armed_points({}) == (frozenset(), "")
    with pytest.raises(ValueError, match="unknown pause points \\['decodin'\\]"):
        pause_points._armed_points({"PDSERVE_PAUSE_AT": "decodin", "PDSERVE_PAUSE_DIR": str(tmp_path)})
    with pytest.raises(ValueError, match="needs PDSERVE_PAUSE_DIR"):
        pause_points._armed_points({"PDSERVE_PAUSE_AT": "decoding"})
    assert pause_points._armed_points({"PDSERVE_PAUSE_AT": " decoding,free ", "PDSERVE_PAUSE_DIR": str(tmp_path)}) \
        == (frozenset({"decoding", "free"}), str(tmp_path))


@pytest.fixture
def armed(tmp_path, monkeypatch):
    monkeypatch.setattr(pause_points, "ARMED", frozenset({"decoding", "finishing", "free"}))
    monkeypatch.setattr(pause_points, "DIRECTORY", str(tmp_path))
    return tmp_path


def test_a_point_pauses_one_thread_per_trigger_until_released(armed):
    pause_points.pause("decoding", "r1")          # no trigger file: passes
    pause_points.pause("last_chunk", "r1")        # not armed: passes
    (armed / "decoding.go").touch()
    held = threading.Thread(target=pause_points.pause, args=("decoding", "r2"))
    held.start()
    while not (armed / "decoding.reached").exists():
        held.join(0.005)
    assert (armed / "decoding.reached").read_text().split()[0] == "r2"
    pause_points.pause("decoding", "r3")          # the trigger was used up: passes
    held.join(0.2)
    assert held.is_alive()
    (armed / "decoding.release").touch()
    held.join(10)
    assert not held.is_alive() and not (armed / "decoding.release").exists()


def test_the_event_loop_keeps_running_while_paused(armed):
    async def run():
        (armed / "finishing.go").touch()
        paused = asyncio.create_task(pause_points.pause_async("finishing", "r1"))
        while not (armed / "finishing.reached").exists():
            await asyncio.sleep(0.005)   # the loop serves other tasks meanwhile
        assert not paused.done()
        (armed / "finishing.release").touch()
        await asyncio.wait_for(paused, 10)
    asyncio.run(run())


def test_a_note_marks_without_waiting(armed):
    pause_points.note("free", "r1")
    pause_points.note("allocate", "r1")   # not armed
    assert [p.name.split(".")[:2] for p in armed.iterdir()] == [["free", "r1"]]
