"""pipe:COMMAND, the one sanctioned shell in segda: only where the user set data.allow_pipe for a URL they trust,
never from a manifest."""

from __future__ import annotations

import io
import signal
import subprocess

from segda.log import SegdaError

PIPE_REFUSED = (
    "pipe: URLs run shell commands and are disabled; set data.allow_pipe=true (or pass --allow-pipe) "
    "if you trust this URL"
)


class PipeReader(io.RawIOBase):
    """stdout of a shell command; close() raises if the command failed."""

    def __init__(self, command: str, timeout: float):
        self.command, self._timeout, self._eof = command, timeout, False
        self._proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE)

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = self._proc.stdout.readinto(buf)
        self._eof = self._eof or not n
        return n

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        self._proc.stdout.close()
        try:
            status = self._proc.wait(timeout=self._timeout)
        except subprocess.TimeoutExpired:  # it ignored the closed pipe: stop it rather than hang
            self._proc.kill()
            status = self._proc.wait()
        # A reader that stops early closes the pipe and the command dies of SIGPIPE (or we kill it): not a failure.
        if status != 0 and (self._eof or status not in (-signal.SIGPIPE, 128 + signal.SIGPIPE, -signal.SIGKILL)):
            raise SegdaError(f"pipe command exited with status {status}: {self.command}; run it in a shell to see why")
