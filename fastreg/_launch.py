"""Direct launch of already-compiled Triton kernels in the eager GPU path (opt-in).

Triton's `kernel[grid](...)` (JITFunction.run) binds the arguments, computes each one's
specialisation, builds a string cache key and looks the compiled kernel up on every call:
9-12 us of host time on current GPUs, more than a small dropout takes on the device. Once a
kernel is compiled for a specialisation, the launch itself is one call of the compiled
kernel's launcher (3-5 us). This module keeps, per kernel and per specialisation key, that
launcher and the arguments Triton passes it, and calls it directly.

Safety, since the launcher's calling convention is internal to Triton (3.6-3.9 here):
* The key is at least as fine as Triton's own specialisation: per tensor its dtype and
  16-byte alignment, per int whether it is 1, divisible by 16 and its width class, per
  constexpr its value, plus the device and any launch options. A key never seen goes
  through the standard launch.
* The second call with a key is a standard launch too, with the compiled kernel's launcher
  wrapped in a recorder: the arguments Triton passes it are compared, one by one, with the
  ones this module would pass. Only when they are identical does the key launch directly
  from then on; any difference (another Triton, launch hooks, an unknown argument type)
  makes the key fall back to the standard launch for good.
* Launch hooks (profilers), pre-run hooks, a callable grid or an unexpected argument type:
  the standard launch.
It is off unless FASTREG_FAST_LAUNCH=1 (read at import), because it has not yet run on a
GPU; the `gpu` tests in tests/test_host_path.py compare it with the standard launch bit for
bit. torch.compile never sees it: the ops' traced path launches through wrap_triton.
"""

from __future__ import annotations

import os

import torch

ENABLED = os.environ.get("FASTREG_FAST_LAUNCH", "0") == "1"

_REFUSED = "refused"
_I32 = 2**31
_I64 = 2**63


def _launch_compiled(launcher, args):
    """The launch itself (a separate function so that a benchmark can stub it out)."""
    launcher(*args)


class _Recorder:
    """Stands in for a compiled kernel's launcher for one call: records and forwards."""

    def __init__(self, inner):
        self.inner, self.args, self.kwargs = inner, None, None

    def __call__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
        return self.inner(*args, **kwargs)


def _same(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False  # tensors must be the very objects passed
    return type(a) is type(b) and a == b


class FastKernel:
    """kernel[grid](*args, **kwargs) with the direct launch once a key is verified."""

    def __init__(self, kernel, runtime=None, device_index=None, raw_stream=None):
        """runtime: where Triton keeps the launch hooks (triton.knobs.runtime); device_index,
        raw_stream: where it gets the current device and stream (torch's). Tests pass fakes."""
        if runtime is None:
            from triton import knobs  # AttributeError/ImportError: no fast launch (see fast)

            runtime = knobs.runtime
        self._runtime = runtime
        self.kernel = kernel
        params = kernel.params
        self._names = [p.name for p in params]
        self._index = {n: i for i, n in enumerate(self._names)}
        self._const = [bool(p.is_constexpr) for p in params]
        empty = object()
        self._defaults = [empty if p.default is _inspect_empty() else p.default for p in params]
        self._empty = empty
        self._entries: dict = {}
        # where Triton itself gets the device and stream (torch's current ones)
        self._device_index = device_index or torch.cuda.current_device
        self._raw_stream = raw_stream or torch._C._cuda_getCurrentRawStream

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(grid, args, kwargs)

    # -- binding and key
    def _bind(self, args, kwargs):
        """(values in parameter order, launch options) or None when unsure."""
        n = len(self._names)
        if len(args) > n:
            return None
        values = list(args) + [self._empty] * (n - len(args))
        options = []
        for name, v in kwargs.items():
            i = self._index.get(name)
            if i is None:
                options.append((name, v))  # num_warps, num_stages, ...: part of the key
            elif i < len(args):
                return None
            else:
                values[i] = v
        for i, v in enumerate(values):
            if v is self._empty:
                if self._defaults[i] is self._empty:
                    return None
                values[i] = self._defaults[i]
        return values, tuple(sorted(options, key=lambda kv: kv[0]))

    def _key(self, values, options, device):
        spec = []
        for v, const in zip(values, self._const):
            if const:
                spec.append(("c", type(v), v))
            elif isinstance(v, torch.Tensor):
                spec.append((v.dtype, v.data_ptr() % 16 == 0))  # launched on `device`
            elif type(v) is bool:
                spec.append(("b", v))
            elif type(v) is int:
                width = 0 if -_I32 <= v < _I32 else (1 if -_I64 <= v < _I64 else 2)
                spec.append(("i", v == 1, v % 16 == 0, width))
            elif type(v) is float:
                spec.append(("f",))
            elif v is None:
                spec.append(("n",))
            else:
                return None
        key = (device, tuple(spec), options)
        try:
            hash(key)
        except TypeError:  # an unhashable constexpr
            return None
        return key

    # -- the call
    def run(self, grid, args, kwargs):
        kernel = self.kernel
        if callable(grid) or getattr(kernel, "pre_run_hooks", None):
            return kernel[grid](*args, **kwargs)
        bound = self._bind(args, kwargs)
        if bound is None:
            return kernel[grid](*args, **kwargs)
        values, options = bound
        device = self._device_index()
        key = self._key(values, options, device)
        if key is None:
            return kernel[grid](*args, **kwargs)
        entry = self._entries.get(key)
        if entry is None:  # first call with this key: compile through the standard launch
            ck = kernel[grid](*args, **kwargs)
            self._entries[key] = ("verify", ck) if ck is not None else _REFUSED
            return ck
        rt = self._runtime
        if (entry is _REFUSED or rt.launch_enter_hook is not None
                or rt.launch_exit_hook is not None):
            return kernel[grid](*args, **kwargs)
        g0 = grid[0]
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        stream = self._raw_stream(device)
        if entry[0] == "ready":
            _, launcher, function, packed = entry
            _launch_compiled(launcher, (g0, g1, g2, stream, function, packed, None, None, None,
                                        *values))
            return None
        return self._verify(key, entry[1], kernel[grid], args, kwargs, (g0, g1, g2, stream),
                            values)

    def _verify(self, key, ck, std, args, kwargs, head, values):
        """A standard launch with ck's launcher recorded; the key launches directly from now on
        only if Triton passed exactly the arguments a direct launch would."""
        try:
            inner = ck._run
            if inner is None:
                raise AttributeError("launcher not initialised")
            mine = (*head, ck.function, ck.packed_metadata, None, None, None, *values)
        except AttributeError:
            self._entries[key] = _REFUSED
            return std(*args, **kwargs)
        rec = _Recorder(inner)
        ck._run = rec
        try:
            out = std(*args, **kwargs)
        finally:
            ck._run = inner
        got = rec.args
        ok = (out is ck and got is not None and not rec.kwargs and len(got) == len(mine)
              and all(_same(a, b) for a, b in zip(got, mine)))
        self._entries[key] = ("ready", inner, ck.function, ck.packed_metadata) if ok else _REFUSED
        return out


def _inspect_empty():
    import inspect

    return inspect.Parameter.empty


_FAST: dict = {}


def fast(kernel):
    """The FastKernel of a Triton JITFunction (one per kernel, made on first use), or the
    kernel itself where this Triton lacks what the direct launch reads."""
    fk = _FAST.get(kernel)
    if fk is None:
        try:
            fk = FastKernel(kernel)
        except (ImportError, AttributeError):
            fk = kernel
        _FAST[kernel] = fk
    return fk
