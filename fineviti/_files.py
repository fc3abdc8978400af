"""Files written another way than open() (a temporary name then a rename, a library's writer) get the mode open()
would have given them."""

from __future__ import annotations

import os


def new_file_mode() -> int:
    """0o666 less the process's umask: the mode open() gives a new file. The umask is read from /proc where it is
    there (setting it to read it back would change it for the other threads meanwhile)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def as_new_file(path: str | os.PathLike) -> None:
    """Gives `path` the mode of a file open() would have made (tempfile.mkstemp makes 0600, and so do some
    libraries' writers: other users of a shared data set or export could not read it)."""
    os.chmod(path, new_file_mode())
