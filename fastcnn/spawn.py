"""Starting helper Python processes (benchmark workers, compile-time probes) that import the same
fastcnn as the process that starts them.

``python -m`` and ``python -c`` put the current folder first on the import path, so a user who
runs ``fastcnn bench`` from a folder that holds a clone named ``fastcnn/`` would otherwise get
that clone in the workers. The child gets the parent's import path instead, and checks that
``fastcnn`` resolves to the parent's file before it does anything.
"""

from __future__ import annotations

import json
import os
import sys

_PATH_VAR = "_FASTCNN_PARENT_SYS_PATH"
_FILE_VAR = "_FASTCNN_PARENT_FILE"

# Prepended to the child's code: the parent's import path, then the check.
BOOTSTRAP = f"""\
import json as _json, os as _os, sys as _sys
_sys.path[:] = _json.loads(_os.environ[{_PATH_VAR!r}])
import fastcnn as _fastcnn
if _os.path.realpath(_fastcnn.__file__) != _os.environ[{_FILE_VAR!r}]:
    raise SystemExit("fastcnn worker: imported " + _fastcnn.__file__ + ", not the parent's "
                     + _os.environ[{_FILE_VAR!r}])
"""


def environment(env=None):
    """``env`` (default: this process's environment) plus what BOOTSTRAP reads."""
    import fastcnn

    env = dict(os.environ if env is None else env)
    cwd = os.getcwd()
    env[_PATH_VAR] = json.dumps([p if p else cwd for p in sys.path])
    env[_FILE_VAR] = os.path.realpath(fastcnn.__file__)
    return env


def python_code(code, *args):
    """A command line running ``code`` (after BOOTSTRAP) with ``args`` in sys.argv[1:]."""
    return [sys.executable, "-c", BOOTSTRAP + code, *args]


def python_module(module, *args):
    """A command line running ``module`` as __main__ (like ``python -m``), after BOOTSTRAP."""
    code = f"import runpy\nrunpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
    return python_code(code, *args)
