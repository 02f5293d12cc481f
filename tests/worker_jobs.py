"""Jobs that tests hand to archive's worker processes, in a module of their own that imports nothing heavy.

A worker imports the module of the function it runs; helpers.py imports torch (through data),
which would cost every new worker seconds.
"""

import os


def find_or_crash(job):
    """A stand-in for archive._find_faces in a worker: inputs named crash* kill their worker process, as a decoder crash would."""
    (path, kind, problem), frames, every, size = job
    if os.path.basename(path).startswith("crash"):
        os._exit(1)
    return {"path": path, "pid": os.getpid()}
