"""detectron2's ``launch`` for gn-det's tools: bad input in a spawned worker reaches the user as one line, and each
worker leaves its process group before it exits."""
import atexit
import functools
import multiprocessing
import os
import sys

import torch.distributed as dist
from torch.multiprocessing import ProcessRaisedException

from detectron2.engine import launch as d2_launch

from gn_det.errors import InputError, input_error_in_traceback, one_line


def run_worker(main_func, *args):
    """``main_func(*args)`` in one process of a launch.

    - Any InputError (a subclass, or one from a DataLoader worker) is raised as a plain InputError of its one line,
      so that the traceback text a spawned worker sends its parent ends with it.
    - After ``main_func`` returns, the process group is destroyed, and a spawned worker then runs its exit handlers
      (logging's flush, multiprocessing's ending of DataLoader workers) and ends without the interpreter's
      teardown. Destroying the group is not enough: detectron2's ``comm`` keeps its local process group until
      teardown, where destroying gloo's objects can abort the process (SIGABRT, "terminate called without an
      active exception", no Python frame left), and ``launch`` then fails a run that had finished.
    - A worker that raises is left as it is: torch has written its traceback for the parent before the process
      exits, and a failure while leaving the group must not replace it.
    """
    try:
        result = main_func(*args)
    except InputError as err:
        raise InputError(one_line(err)) from None
    if dist.is_available() and dist.is_initialized():
        spawned = dist.get_world_size() > 1 and multiprocessing.parent_process() is not None
        dist.destroy_process_group()
        if spawned:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    return result


def launch(main_func, args):
    """``detectron2.engine.launch(main_func, ...)`` with train_net's flags (``--num-gpus``, ``--num-machines``,
    ``--machine-rank``, ``--dist-url``) and ``main_func(args)`` in every process.

    Each process checks its input itself (:func:`gn_det.engine.setup`); when a spawned worker raises an
    InputError, torch hands the parent its traceback text, and the parent raises that InputError again: the
    tool prints its one line, not the worker's traceback. Any other error of a worker keeps its traceback.
    """
    try:
        d2_launch(functools.partial(run_worker, main_func), args.num_gpus,
                  num_machines=args.num_machines, machine_rank=args.machine_rank, dist_url=args.dist_url,
                  args=(args,))
    except ProcessRaisedException as err:
        input_error = input_error_in_traceback(err.msg)
        if input_error is None:
            raise
        raise input_error from None
