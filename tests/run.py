#!/usr/bin/python3
"""incept's test runner (Debian's python3, which has torch 1.13 as the reference oracle).

Runs every test_* function of every tests/test_*.py, and every C test program built from
tests/test_*.c (each prints TAP-like lines: "ok - name" or "not ok - name: why").
`tests/run.py [substring...]` runs only the tests whose name contains one of the substrings.
Prints one line per test, then `N passed, N failed` last; exits 1 on any failure.
"""
import importlib.util, os, subprocess, sys, time, traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
BUILD = os.environ.get("INCEPT_BUILD", os.path.join(HERE, "..", "build"))
filters = sys.argv[1:]
passed = failed = 0
failures = []


def wanted(name):
    return not filters or any(f in name for f in filters)


def report(name, ok, why="", secs=0.0):
    global passed, failed
    if ok:
        passed += 1
        print(f"PASS {name} ({secs:.1f}s)", flush=True)
    else:
        failed += 1
        failures.append(name)
        print(f"FAIL {name}: {why}", flush=True)


def run_c_program(path):
    name = os.path.basename(path)
    if not wanted(name):
        return
    t0 = time.time()
    p = subprocess.run([path], capture_output=True, text=True, timeout=1800)
    secs = time.time() - t0
    seen = 0
    for line in p.stdout.splitlines():
        if line.startswith("ok - "):
            seen += 1
            report(f"{name}: {line[5:]}", True, secs=0)
        elif line.startswith("not ok - "):
            seen += 1
            report(f"{name}: {line[9:]}", False, line[9:])
    if p.returncode != 0 or seen == 0:
        why = f"exit {p.returncode}, {seen} results; stderr: {p.stderr.strip()[-2000:]}"
        report(f"{name} (program)", False, why, secs)


def run_py_module(path):
    modname = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(modname, path)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except Exception:
        report(f"{modname} (import)", False, traceback.format_exc().strip().splitlines()[-1])
        return
    for fname in [n for n in vars(mod) if n.startswith("test_") and callable(getattr(mod, n))]:
        name = f"{modname}.{fname}"
        if not wanted(name):
            continue
        t0 = time.time()
        try:
            getattr(mod, fname)()
            report(name, True, secs=time.time() - t0)
        except Exception as e:
            tb = traceback.format_exc().strip().splitlines()
            where = next((l.strip() for l in reversed(tb) if l.strip().startswith("File")), "")
            report(name, False, f"{type(e).__name__}: {e} [{where}]")


def main():
    t0 = time.time()
    cdir = os.path.join(BUILD, "tests")
    if os.path.isdir(cdir):
        for f in sorted(os.listdir(cdir)):
            p = os.path.join(cdir, f)
            if f.startswith("test_") and os.access(p, os.X_OK):
                run_c_program(p)
    for f in sorted(os.listdir(HERE)):
        if f.startswith("test_") and f.endswith(".py"):
            run_py_module(os.path.join(HERE, f))
    print(f"\ntotal time {time.time() - t0:.0f}s")
    for n in failures:
        print(f"failed: {n}")
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed or passed == 0 else 0)


if __name__ == "__main__":
    main()
