# Runs tools/recipe_proxy.py for several recipe candidates x several seeds, P processes at a
# time (on one GPU they share it), and prints each candidate's mean, spread and range of the
# final test top-1. Seeds of one recipe spread by about +-0.15 points on Fashion-MNIST, so telling
# a candidate 0.2 points better apart takes ~4 seeds each (standard error of a difference of
# means ~0.09). Not used by the build or the tests.
#
#   python3 tools/recipe_sweep.py --out /tmp/sweep --seeds 0 1 2 3 --parallel 8 \
#       base="" lr1="--lr 0.1" ls0="--ls 0" mix="--mixup 0.2"
#
# Each candidate is NAME="proxy options" (added to the common ones: --size 64 --epochs 21
# --precise-bn 200, overridable with --common). Logs: OUT/NAME-sSEED.log; a run whose log
# already ends in a "final" line is not run again, so an interrupted sweep resumes.
import argparse, json, os, shlex, statistics, subprocess, sys, time

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
p.add_argument("--parallel", type=int, default=4)
p.add_argument("--common", default="--size 64 --epochs 21 --precise-bn 200")
p.add_argument("--python", default=sys.executable)
p.add_argument("candidates", nargs="+", help='NAME="proxy options"')
a = p.parse_args()

proxy = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipe_proxy.py")
os.makedirs(a.out, exist_ok=True)
cands = []
for c in a.candidates:
    name, _, opts = c.partition("=")
    if not name or "/" in name:
        sys.exit(f"recipe_sweep: bad candidate '{c}': want NAME=\"options\"")
    cands.append((name, shlex.split(opts)))


def final_acc(path):
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("final "):
                    return json.loads(line[6:])["acc"]
    except OSError:
        pass
    return None


jobs = [(n, o, s) for n, o in cands for s in a.seeds
        if final_acc(os.path.join(a.out, f"{n}-s{s}.log")) is None]
running, t0 = [], time.time()
while jobs or running:
    while jobs and len(running) < a.parallel:
        n, o, s = jobs.pop(0)
        cmd = [a.python, proxy, "--name", f"{n}-s{s}", "--seed", str(s), "--out", a.out,
               *shlex.split(a.common), *o]
        with open(os.path.join(a.out, f"{n}-s{s}.err"), "w") as err:  # the child keeps its copy
            running.append((subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err), n, s))
    time.sleep(2)
    for r in [r for r in running if r[0].poll() is not None]:
        running.remove(r)
        print(f"[{time.time() - t0:.0f}s] {r[1]} seed {r[2]}: exit {r[0].returncode}", flush=True)

print(f"{'candidate':<16} {'n':>2} {'mean':>7} {'sd':>5} {'min':>6} {'max':>6}  options")
for n, o in cands:
    accs = [x for s in a.seeds if (x := final_acc(os.path.join(a.out, f"{n}-s{s}.log"))) is not None]
    if not accs:
        print(f"{n:<16}  0  (no finished run: see {a.out}/{n}-s*.err)")
        continue
    sd = statistics.stdev(accs) if len(accs) > 1 else float("nan")
    print(f"{n:<16} {len(accs):>2} {statistics.mean(accs):7.3f} {sd:5.2f} {min(accs):6.2f} "
          f"{max(accs):6.2f}  {' '.join(o)}")
