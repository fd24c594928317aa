"""The way round the backend-stub / standard-library mismatch of the tritonserver that nvidia-pytriton ships.

The ``triton_python_backend_stub`` for Python 3.11 embeds CPython 3.11.2, but runs with the venv's standard
library (3.11.7 here). From 3.11.6 on, ``multiprocessing.resource_tracker`` calls
``self._lock._recursion_count()``, which the 3.11.2 C ``RLock`` lacks: anything that touches the resource
tracker (shared memory, semaphores, process pools) fails inside the stub with ``AttributeError:
'_thread.RLock' object has no attribute '_recursion_count'`` (pytriton issue #51). The pure-Python RLock
has the method. Every model.py this package exports calls ``patch_resource_tracker_lock()`` before anything
else, so the fix lives in the exported repository and needs no change to the environment.
"""

from __future__ import annotations

import threading


def patch_resource_tracker_lock() -> bool:
    """Give the resource tracker a lock with ``_recursion_count`` if it lacks one; True if it patched."""
    from multiprocessing import resource_tracker

    tracker = resource_tracker._resource_tracker
    if hasattr(tracker._lock, "_recursion_count"):
        return False
    tracker._lock = threading._PyRLock()
    return True
