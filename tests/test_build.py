"""The native build and the promise that `import fastreg` never fails for a missing part."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def test_import_without_native_extension_warns_once_and_falls_back():
    code = (
        "import sys, warnings\n"
        "sys.modules['fastreg._C'] = None  # as if the extension had not been built\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import fastreg, torch\n"
        "    y = fastreg.dropout(torch.ones(64), 0.5, seed=1)\n"
        "msgs = [str(x.message) for x in w if 'fastreg._C' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert 'not available' in msgs[0]\n"
        "assert set(y.unique().tolist()) <= {0.0, 2.0}\n"
        "print('ok')\n"
    )
    r = _run(code)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr


def test_forced_backend_env_is_validated():
    r = _run("import fastreg, torch; fastreg.dropout(torch.ones(4))", {"FASTREG_BACKEND": "gpu"})
    assert r.returncode != 0 and "FASTREG_BACKEND must be one of" in r.stderr


def test_forced_backend_env_is_used():
    code = ("import fastreg, torch\n"
            "from fastreg import _backend\n"
            "print(_backend.select(torch.device('cpu'), ('numba', 'triton'), 'x'))\n")
    r = _run(code, {"FASTREG_BACKEND": "torch"})
    assert r.returncode == 0 and r.stdout.strip() == "torch", r.stderr


def test_forcing_cuda_build_without_toolchain_is_a_clear_error():
    # PATH without nvcc and no CUDA_HOME: FASTREG_CUDA=1 must fail with the reason.
    code = "import runpy, sys; sys.argv = ['setup.py', '--version']; runpy.run_path('setup.py')"
    env = {"FASTREG_CUDA": "1", "PATH": "/usr/bin:/bin", "CUDA_HOME": "/nonexistent"}
    r = _run(code, env)
    assert r.returncode != 0
    assert "FASTREG_CUDA=1 but the CUDA part cannot be built" in (r.stderr + r.stdout)


def test_bad_fastreg_cuda_value():
    r = _run("import runpy, sys; sys.argv = ['setup.py', '--version']; runpy.run_path('setup.py')",
             {"FASTREG_CUDA": "yes"})
    assert r.returncode != 0 and "FASTREG_CUDA must be 0, 1 or unset" in (r.stderr + r.stdout)
