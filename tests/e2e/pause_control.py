"""The test's side of the workers' pause points (worker/pause_points.py): arm a point for the
next request that reaches it, wait until one has, see which worker handled a Free, release."""
from __future__ import annotations

import time
from pathlib import Path

from worker.pause_points import POINTS


class PauseControl:
    """The files in one pause directory, shared by every worker of a cluster."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def env(self) -> dict:
        """The environment that arms every point in the cluster's workers."""
        return {"PDSERVE_PAUSE_AT": ",".join(sorted(POINTS)), "PDSERVE_PAUSE_DIR": str(self.directory)}

    def arm(self, point: str) -> None:
        """The next thread to reach ``point`` pauses there."""
        assert point in POINTS, point
        (self.directory / f"{point}.reached").unlink(missing_ok=True)
        (self.directory / f"{point}.go").touch()

    def wait_reached(self, point: str, timeout_s: float = 60.0) -> tuple[str, int]:
        """(rid, pid) of the request paused at ``point``, once one is."""
        path = self.directory / f"{point}.reached"
        self._wait(path.exists, timeout_s, f"no request reached pause point {point}")
        rid, pid = path.read_text().split()
        return rid, int(pid)

    def wait_freed(self, rid: str, pids: set[int], timeout_s: float = 30.0) -> None:
        """Until every worker in ``pids`` has handled the router's Free for ``rid``."""
        def done() -> bool:
            return all((self.directory / f"free.{rid}.{pid}").exists() for pid in pids)
        self._wait(done, timeout_s, f"workers {sorted(pids)} did not handle the Free for {rid}")

    def release(self, point: str, timeout_s: float = 30.0) -> None:
        """Let the paused thread go on, and wait until it has."""
        release = self.directory / f"{point}.release"
        release.touch()
        self._wait(lambda: not release.exists(), timeout_s, f"pause point {point} was never released")
        (self.directory / f"{point}.reached").unlink()

    def reset(self) -> None:
        """Disarm everything and let every paused thread go (after a failed test)."""
        for point in POINTS:
            (self.directory / f"{point}.go").unlink(missing_ok=True)
            if (self.directory / f"{point}.reached").exists():
                try:
                    self.release(point, timeout_s=5.0)
                except AssertionError:   # its worker is gone: no stale release may stay behind
                    (self.directory / f"{point}.release").unlink(missing_ok=True)
                    (self.directory / f"{point}.reached").unlink(missing_ok=True)

    @staticmethod
    def _wait(predicate, timeout_s: float, message: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"{message} within {timeout_s}s")
            time.sleep(0.005)
