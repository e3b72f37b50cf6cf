"""Serial and threaded copies of one Numba driver.

A driver loops over chunks with numba.prange. Jitted with parallel=True, it runs on the
thread pool. Jitted without it, prange is a plain range. The serial copy is for small
inputs, where waking the thread pool costs more than the work (and a busy core would stall
the whole parallel region).
"""

import functools
import types

import numba


def _renamed(fn, suffix):
    """`fn` under another name. Numba's on-disk cache is keyed by the function's name and
    line, not by its compile flags. Two njit copies of one function would therefore load
    each other's machine code: the "parallel" one ran serial code until this was found."""
    f = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix, fn.__defaults__,
                           fn.__closure__)
    f.__qualname__ = fn.__qualname__ + suffix
    f.__doc__ = fn.__doc__
    return f


def serial_and_parallel(fn, **flags):
    """(serial, threaded) cached njit copies of the prange driver `fn`."""
    return (numba.njit(cache=True, **flags)(_renamed(fn, "_serial")),
            numba.njit(parallel=True, cache=True, **flags)(_renamed(fn, "_parallel")))


def by_size(serial_below, **flags):
    """Decorator: the prange driver as one callable that runs its serial copy when its first
    argument (an array) has fewer than `serial_below` elements, and its threaded copy
    otherwise. Callers keep one name; `.serial` and `.parallel` are the two copies. Measured
    on the 2-core EPYC: a 4096-element noise pass took 17 us through the threaded copy with
    numba.set_num_threads(1) around it, 8 us through the serial one."""
    def wrap(fn):
        serial, parallel = serial_and_parallel(fn, **flags)

        @functools.wraps(fn)
        def call(*args):
            return (serial if args[0].size < serial_below else parallel)(*args)

        call.serial, call.parallel = serial, parallel
        return call
    return wrap
