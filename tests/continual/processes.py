"""Running a command to completion, or killing it with kill -9 at a chosen moment (the resume
tests)."""

import glob
import signal
import subprocess
import time

from fomo_jax import runtime


def run(command, timeout=900):
    """Run `command` from the checkout's root; it must succeed. Returns the completed process."""
    result = subprocess.run(command, cwd=runtime.REPO_ROOT, capture_output=True, text=True,
                            timeout=timeout)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def kill_when(command, marker: str, deadline=600):
    """Start `command`, kill -9 it once the path pattern `marker` exists."""
    process = subprocess.Popen(command, cwd=runtime.REPO_ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    end = time.time() + deadline
    while not glob.glob(marker):
        assert process.poll() is None and time.time() < end, "ended before the kill"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
