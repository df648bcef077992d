"""Every subcommand's failure is one `error:` line: what libraries' background threads and native callbacks raise
while it fails becomes one `warning:` line each, never a traceback (`ipadapter_jax.cli.main.report_errors`)."""

import subprocess
import sys
import textwrap

from ipadapter_jax.cli.main import EXIT_RUNTIME_ERROR

FAILING_COMMAND = textwrap.dedent(
    """
    import gc, sys, threading
    from ipadapter_jax.cli.main import report_errors

    class RaisesWhenCollected:  # what a native callback into a closed event loop amounts to: an unraisable error
        def __del__(self):
            raise RuntimeError("Event loop is closed")

    def run(argv):
        thread = threading.Thread(target=lambda: 1 / 0, name="writer")
        thread.start()
        thread.join()
        RaisesWhenCollected()
        gc.collect()
        raise OSError(28, "No space left on device", "/tmp/x")

    sys.exit(report_errors(run, []))
    """
)


def test_background_and_unraisable_failures_are_one_line_each():
    proc = subprocess.run([sys.executable, "-c", FAILING_COMMAND], capture_output=True, text=True, timeout=120)
    lines = proc.stderr.splitlines()
    assert proc.returncode == EXIT_RUNTIME_ERROR, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert lines == [
        "warning: in background thread writer: ZeroDivisionError: division by zero",
        "warning: in a library callback: Event loop is closed",
        "error: [Errno 28] No space left on device: '/tmp/x'; likely cause: the disk is full (free space, or give a "
        "folder on a larger disk); rerun to resume",
    ], proc.stderr
