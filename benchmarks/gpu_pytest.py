#!/usr/bin/env python3
"""pytest for a time-boxed GPU stage: ``python benchmarks/gpu_pytest.py PYTEST_ARGS...``.

* SIGTERM / SIGINT raise KeyboardInterrupt in the test in flight, so pytest ends at once and still writes its
  summary and ``--junitxml`` file (by default SIGTERM kills pytest outright and leaves neither). Code under test that
  swallows that KeyboardInterrupt (an in-process ``gtpt profile`` turns it into "write the report and return") cannot
  keep the session going: after the first signal the session stops when the current test ends. Further signals are
  only recorded, so the summary is written whole; the stage's SIGKILL is the backstop.
* ``GTPT_PYTEST_SELECT=file.py,other.py``: keep only the tests of those files plus every ``gpu``-marked test (the
  rest are reported as deselected): the GPU correctness stage without the CPU-only suite. Run from the repository
  root (the selection loads as the plug-in ``benchmarks.gpu_pytest``, in pytest-xdist's workers too).
"""
import os
import signal
import sys

import pytest


class StopOnSignal:
    def __init__(self):
        self.signum = None
        self.session = None

    def _handler(self, signum, frame):
        if self.signum is not None:
            return  # the summary is being written: let it finish
        self.signum = signum
        if self.session is not None:
            self.session.shouldstop = f"stopped by {signal.Signals(signum).name} (the stage's deadline)"
        raise KeyboardInterrupt

    def install(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._handler)

    def pytest_sessionstart(self, session):
        self.session = session

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logfinish(self, nodeid, location):
        if self.signum is not None and self.session is not None:
            self.session.shouldstop = f"stopped by {signal.Signals(self.signum).name} (the stage's deadline)"


def pytest_collection_modifyitems(config, items):
    """The selection, as a plug-in module (``-p benchmarks.gpu_pytest``) so that pytest-xdist's workers, which do
    the collecting there, load it too."""
    files = {f for f in os.environ.get("GTPT_PYTEST_SELECT", "").split(",") if f}
    if not files:
        return
    keep, drop = [], []
    for item in items:
        (keep if os.path.basename(str(item.fspath)) in files or item.get_closest_marker("gpu") else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def main(argv=None) -> int:
    stop = StopOnSignal()
    stop.install()
    args = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get("GTPT_PYTEST_SELECT"):
        args = ["-p", "benchmarks.gpu_pytest"] + args
    try:
        return int(pytest.main(args, plugins=[stop]))
    except KeyboardInterrupt:  # before pytest's session began (loading conftest / importing torch)
        print(f"gpu_pytest: stopped by {signal.Signals(stop.signum or signal.SIGINT).name} before the test session "
              "started", flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
