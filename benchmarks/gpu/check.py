"""The GPU readiness check (issue 13): every CUDA path of the project in one command, one table.

Run by benchmarks/gpu/check.sh (which installs the carried wheels first); uses
the standard library only, so it still writes its table when the install or
the project is broken. Each step is a separate process with its own time
limit: a step that fails, or runs out of time, is recorded with the tail of
its output and the next step runs. After every step the table is rewritten to
OUTDIR/gpu_check.md and OUTDIR/gpu_check.json (OUTDIR: $OUT, else
./gpu_check_out), with every step's output in OUTDIR/gpu_check.log, so even a
run killed from outside leaves its figures.

Steps (data: the COCO128 copy in .gpudata/coco128 that prepare.sh makes; its
photos sorted by name, the first half "train", the second half "held-out"):
  env          GPU, torch / torchvision / numpy / faiss versions; every project module imports
  infer        detector forward + post-processing ms/img, random-init default (ResNet-50) model,
               800 px, batch 1 and 8, AMP on CUDA (benchmarks/gpu/bench_infer.py)
  faiss        FAISS search latency: on the GPU when faiss is a GPU build, else says so
               (and times the CPU build)
  discover     stage-1 pseudo-labels of all the photos (images/s); split into the two halves
  speed        training it/s at batch 8 on the train half: one short run with --burn-in,
               its burn-in iterations and the Mean Teacher ones (those that log alpha_label)
  real_train   --burn-in B then M Mean Teacher iterations on the train half; B and M are
               scaled down (same ratio) when the rates measured above say they would not
               fit the time budget
  eval_pseudo / eval_student / eval_teacher
               class-agnostic box AR of the pseudo-labels and of the trained student and
               teacher on the held-out half (`hassod eval`, --eval-max-detections 100 a photo)
  index_discovery / index_detector
               `index build` images/s of the held-out half with stage-1 discovery regions and
               with the trained detector's regions (the speed run's when the real run failed)

Usage: python benchmarks/gpu/check.py [--cpu-smoke] [--budget S] [--burn-in 1500] [--mt 500] ...
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
CLI = [PY, "-m", "retrieval.cli"]


class StepError(Exception):
    """A step's failure: the message goes into the table."""


@dataclass
class Step:
    name: str
    title: str
    status: str = "pending"  # ok | failed | timeout | skipped
    seconds: float = 0.0
    result: str = ""
    metrics: dict = field(default_factory=dict)
    error: str = ""
    limit_s: float = 0.0


class Check:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.started = time.monotonic()
        self.deadline = self.started + args.budget
        self.work = Path(args.work).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.outdir = Path(args.out).resolve()
        self.outdir.mkdir(parents=True, exist_ok=True)
        self.logs = self.work / "logs"
        self.logs.mkdir(exist_ok=True)
        self.steps: list[Step] = []
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": os.pathsep.join(p for p in [os.environ.get("PYTHONPATH", ""), str(REPO)] if p)}
        self.header: dict = {"mode": "cpu-smoke" if args.cpu_smoke else "gpu", "device": args.device,
                             "host": platform.node(), "python": platform.python_version(),
                             "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                             "budget_s": args.budget, "settings": {k: v for k, v in vars(args).items()}}

    # ---------------------------------------------------------------- running
    def left(self) -> float:
        return self.deadline - time.monotonic()

    def step(self, name: str, title: str, limit: float, func, *, min_s: float = 20.0) -> Step:
        step = Step(name, title)
        self.steps.append(step)
        limit = min(limit, self.left())
        step.limit_s = round(limit)
        if self.args.steps and name not in self.args.steps:
            step.status, step.result = "skipped", "not selected (--steps)"
        elif limit < min_s:
            step.status, step.result = "skipped", f"time budget spent ({self.args.budget:.0f} s in all)"
        else:
            print(f"\n=== {name}: {title} (limit {limit:.0f} s)", flush=True)
            start = time.monotonic()
            try:
                result = func(step, start + limit)
                step.status = "ok"
                step.result = result if isinstance(result, str) else step.result
            except subprocess.TimeoutExpired:
                step.status, step.error = "timeout", f"over its limit of {limit:.0f} s\n" + self.tail(name)
                step.result = step.result or "timed out"
            except StepError as exc:
                step.status, step.error = "failed", str(exc)
            except Exception as exc:  # a bug of this script must not lose the table
                step.status, step.error = "failed", f"{type(exc).__name__}: {exc}"
            step.seconds = round(time.monotonic() - start, 1)
            if step.error:
                first = step.error.strip().splitlines()[0][:160]
                step.result = f"{step.result}: {first}" if step.result else first
            print(f"--- {name}: {step.status} in {step.seconds:.0f} s: {step.result}"
                  + (f"\n{textwrap.indent(step.error, '    ')}" if step.error else ""), flush=True)
        self.write()
        return step

    def run(self, name: str, cmd: list[str], until: float, check: bool = True) -> tuple[int, str]:
        """Run ``cmd`` with stdout and stderr into the step's log until ``until`` (monotonic);
        returns (exit status, the text it printed). Kills its whole process group at the limit."""
        log_path = self.logs / f"{name}.log"
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"$ {' '.join(map(str, cmd))}\n")
            log.flush()
            started = log.tell()
            proc = subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                    env=self.env, start_new_session=True)
            try:
                rc = proc.wait(timeout=max(1.0, until - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill(proc)
                raise
        text = log_path.read_text(encoding="utf-8", errors="replace")[started:]
        if check and rc != 0:
            tail = self.tail(name)
            last = tail.splitlines()[-1] if tail else ""
            raise StepError(f"exit status {rc}: {last}\n{tail}")
        return rc, text

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=10)
                return
            except subprocess.TimeoutExpired:
                continue

    def tail(self, name: str, lines: int = 12) -> str:
        path = self.logs / f"{name}.log"
        if not path.exists():
            return ""
        kept = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()
                if ln.strip() and "\r" not in ln]
        return "\n".join(kept[-lines:])

    @staticmethod
    def last_json(text: str) -> dict:
        for line in reversed(text.splitlines()):
            line = line.strip()
            if line.startswith("{"):
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    continue
        raise StepError("no JSON summary in the output")

    # ---------------------------------------------------------------- output
    def write(self) -> None:
        rows = [asdict(s) for s in self.steps]
        payload = {**self.header, "elapsed_s": round(time.monotonic() - self.started, 1), "steps": rows}
        (self.outdir / "gpu_check.json").write_text(json.dumps(payload, indent=1))
        (self.outdir / "gpu_check.md").write_text(self.table())
        with open(self.outdir / "gpu_check.log", "w", encoding="utf-8") as out:
            for s in self.steps:
                path = self.logs / f"{s.name}.log"
                if path.exists():
                    out.write(f"\n===== {s.name} ({s.status})\n")
                    out.write(path.read_text(encoding="utf-8", errors="replace"))

    def table(self) -> str:
        h = self.header
        lines = [f"# GPU check ({h['mode']}), {h['started_utc']} UTC", "",
                 f"{h.get('gpu', 'device ' + h['device'])}; {h.get('versions', 'versions: see the env step')}; "
                 f"host {h['host']}; "
                 f"{time.monotonic() - self.started:.0f} s of a {h['budget_s']:.0f} s budget", "",
                 "| step | what | status | s | result |", "| --- | --- | --- | ---: | --- |"]
        for s in self.steps:
            result = s.result.replace("|", "/").replace("\n", " ")
            lines.append(f"| {s.name} | {s.title} | {s.status} | {s.seconds:.0f} | {result} |")
        failed = [s for s in self.steps if s.error]
        if failed:
            lines += ["", "## Errors (last lines of each failed step's output)"]
            for s in failed:
                lines += ["", f"### {s.name} ({s.status})", "", "```", s.error.strip(), "```"]
        return "\n".join(lines) + "\n"


# -------------------------------------------------------------------- helpers
def split_halves(data: Path, work: Path, count: int) -> dict:
    """Symlinks to the first ``count`` photos, their ground truth, and its two halves by sorted name."""
    images = work / "images"
    images.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in (data / "images").iterdir()
                   if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:count]
    if len(names) < 2:
        raise StepError(f"fewer than 2 photos in {data / 'images'}: run benchmarks/gpu/prepare.sh")
    for old in images.iterdir():
        if old.name not in names:
            old.unlink()
    for name in names:
        link = images / name
        if not link.exists():
            link.symlink_to((data / "images" / name).resolve())
    half = len(names) // 2
    heldout = work / "heldout_images"  # the index steps build from these
    heldout.mkdir(exist_ok=True)
    for old in heldout.iterdir():
        old.unlink()
    for name in names[half:]:
        (heldout / name).symlink_to((data / "images" / name).resolve())
    gt = json.loads((data / "instances.json").read_text())
    parts = {"train": set(names[:half]), "heldout": set(names[half:]), "all": set(names)}
    for part, keep in parts.items():
        ims = [im for im in gt["images"] if im["file_name"] in keep]
        ids = {im["id"] for im in ims}
        subset = {**gt, "images": ims, "annotations": [a for a in gt["annotations"] if a["image_id"] in ids]}
        (work / f"gt_{part}.json").write_text(json.dumps(subset))
    return {"images": images, "heldout_images": heldout, "train": len(parts["train"]),
            "heldout": len(parts["heldout"])}


def split_pseudo(pseudo: Path, gt_dir: Path, work: Path) -> dict[str, Path]:
    """The pseudo-label file cut into the train half and the held-out half (by the gt files' names)."""
    data = json.loads(pseudo.read_text())
    out = {}
    for part in ("train", "heldout"):
        names = {im["file_name"] for im in json.loads((gt_dir / f"gt_{part}.json").read_text())["images"]}
        ims = [im for im in data["images"] if Path(im["file_name"]).name in names]
        ids = {im["id"] for im in ims}
        path = work / f"pseudo_{part}.json"
        path.write_text(json.dumps({**data, "images": ims,
                                    "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}))
        out[part] = path
    return out


def log_rates(run: Path, skip: int) -> dict:
    """Iterations per second of the burn-in and of the Mean Teacher iterations in ``run/log.jsonl``
    (MT iterations log ``alpha_label``), from the per-iteration ``seconds``, leaving out each phase's
    first ``skip`` iterations (cuDNN autotuning, allocator growth, the teacher's first copy)."""
    path = run / "log.jsonl"
    if not path.exists():
        raise StepError(f"no {path}")
    phases: dict[str, list[float]] = {"burnin": [], "mt": []}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "seconds" in record:
            phases["mt" if "alpha_label" in record else "burnin"].append(float(record["seconds"]))
    out: dict = {}
    for phase, secs in phases.items():
        timed = secs[skip:] if len(secs) > skip else secs
        out[f"{phase}_iterations"] = len(secs)
        if timed:
            out[f"{phase}_it_s"] = round(len(timed) / sum(timed), 3)
    return out


def ar_line(report: dict, with_1000: bool = False) -> str:
    """'box AR@100 …[, AR@1000 …], AP …; mask AR@100 …' of an `eval --json` report."""
    if not isinstance(report.get("bbox"), dict) or "AR@100" not in report["bbox"]:
        raise StepError(f"no bbox AR@100 in the eval report (keys: {list(report)[:10]})")
    box, mask = report["bbox"], report.get("segm") or {}
    line = (f"box AR@100 {box['AR@100']:.3f}" + (f", AR@1000 {box['AR@1000']:.3f}" if with_1000 else "")
            + f", AP {box['AP']:.3f}")
    if isinstance(mask.get("AR@100"), (int, float)):
        line += f"; mask AR@100 {mask['AR@100']:.3f}"
    return line + f" ({report.get('images', '?')} photos, {report.get('detections', '?')} detections"


# -------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny sizes on the CPU (--device cpu, tiny detector, few images and iterations)")
    parser.add_argument("--device", default=None, help="[cuda; cpu with --cpu-smoke]")
    parser.add_argument("--data", default=str(REPO / ".gpudata" / "coco128"), help="prepare.sh's COCO128 copy")
    parser.add_argument("--work", default=str(REPO / "gpu_check_work"),
                        help="scratch folder: runs, indexes, logs [./gpu_check_work, git-ignored, kept by a warm machine]")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "gpu_check_out"),
                        help="where gpu_check.md/.json/.log go [$OUT, else ./gpu_check_out]")
    parser.add_argument("--budget", type=float, default=None, help="seconds for all steps [450; smoke 1800]")
    parser.add_argument("--images", type=int, default=None, help="photos used, half train half held-out [all; smoke 8]")
    parser.add_argument("--backbone", default=None, help="detector backbone to train [efficientnet_lite0; smoke tiny]")
    parser.add_argument("--batch-size", type=int, default=None, help="training batch [8; smoke 2]")
    parser.add_argument("--workers", type=int, default=None, help="data-loading / discovery processes [8; smoke 1]")
    parser.add_argument("--infer-edge", type=int, default=None, help="[800; smoke 256]")
    parser.add_argument("--infer-batches", default=None, help="[1,8; smoke 1,2]")
    parser.add_argument("--infer-count", type=int, default=None, help="timed photos per batch size [8; smoke 4]")
    parser.add_argument("--speed-iters", type=int, default=None,
                        help="timed iterations of each phase of the speed run [25; smoke 3]")
    parser.add_argument("--burn-in", type=int, default=None, help="real run's burn-in iterations [1500; smoke 4]")
    parser.add_argument("--mt", type=int, default=None, help="real run's Mean Teacher iterations [500; smoke 2]")
    parser.add_argument("--eval-max-detections", type=int, default=100,
                        help="detections kept per photo in the eval steps (AR@1000 needs 1000; slower) [100]")
    parser.add_argument("--reserve", type=float, default=None,
                        help="seconds kept for the steps after the real run [140; smoke 300]")
    parser.add_argument("--steps", default="", help="comma-separated step names to run [all]")
    args = parser.parse_args()

    smoke = args.cpu_smoke
    defaults = dict(device="cpu" if smoke else "cuda", budget=1800 if smoke else 450, images=8 if smoke else 0,
                    backbone="tiny" if smoke else "efficientnet_lite0", batch_size=2 if smoke else 8,
                    workers=1 if smoke else 8, infer_edge=256 if smoke else 800,
                    infer_batches="1,2" if smoke else "1,8", infer_count=4 if smoke else 8,
                    speed_iters=3 if smoke else 25, burn_in=4 if smoke else 1500, mt=2 if smoke else 500,
                    reserve=300 if smoke else 140)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.steps = [s for s in args.steps.split(",") if s]
    check = Check(args)
    data = Path(args.data)
    dev = args.device
    work = check.work
    state: dict = {}

    # ---- install (done by check.sh before this script; recorded here)
    installed = os.environ.get("GPU_CHECK_INSTALL_STATUS")
    if installed:
        step = Step("install", "carried wheels (.whl) installed, on PYTHONPATH",
                    status=installed, seconds=float(os.environ.get("GPU_CHECK_INSTALL_SECONDS", 0)),
                    result=os.environ.get("GPU_CHECK_INSTALL_RESULT", ""))
        if installed == "failed":
            log = Path(os.environ.get("GPU_CHECK_INSTALL_LOG", "/nonexistent"))
            step.error = log.read_text(errors="replace")[-2000:] if log.exists() else "no install log"
        check.steps.append(step)
        check.write()

    # ---- env
    def env(step: Step, until: float) -> str:
        probe = textwrap.dedent("""
            import importlib, json, pkgutil, sys, platform
            out = {"python": platform.python_version()}
            import torch, torchvision, numpy
            out.update(torch=torch.__version__, torchvision=torchvision.__version__, numpy=numpy.__version__,
                       cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
            if torch.cuda.is_available():
                p = torch.cuda.get_device_properties(0)
                out.update(gpu=p.name, gpu_mib=p.total_memory // 2**20, gpus=torch.cuda.device_count())
            failed = {}
            modules = []
            for package in ("hassod", "indexer", "retrieval"):
                pkg = importlib.import_module(package)
                modules.append(package)
                for info in pkgutil.walk_packages(pkg.__path__, package + "."):
                    if not info.name.endswith(".__main__"):  # runs the command line when imported
                        modules.append(info.name)
            for name in modules:
                try:
                    importlib.import_module(name)
                except Exception as exc:
                    failed[name] = f"{type(exc).__name__}: {exc}"
            for name in ("faiss", "pycocotools", "sqlalchemy", "fastapi", "pydantic", "uvicorn", "pydensecrf",
                         "timm", "numba", "scipy", "skimage"):
                try:
                    m = importlib.import_module(name)
                    out[name] = getattr(m, "__version__", "ok")
                except Exception as exc:
                    failed[name] = f"{type(exc).__name__}: {exc}"
            try:
                import faiss
                out["faiss_gpus"] = faiss.get_num_gpus()
            except Exception:
                pass
            out["modules"] = len(modules)
            out["project_path"] = str(importlib.import_module("hassod").__path__[0])
            out["import_failures"] = failed
            print(json.dumps(out))
        """)
        _, text = check.run("env", [PY, "-c", probe], until)
        info = check.last_json(text)
        step.metrics = info
        check.header["gpu"] = (f"{info['gpu']} ({info['gpu_mib']} MiB)" if info.get("gpu")
                               else "no CUDA device" + ("" if smoke else " (!)"))
        check.header["versions"] = (f"Python {info['python']}, torch {info['torch']}, torchvision "
                                    f"{info['torchvision']} (CUDA {info['cuda']}), numpy {info['numpy']}, "
                                    f"faiss {info.get('faiss', '?')}")
        print(check.header["gpu"], "|", check.header["versions"])
        project_failures = [m for m in info["import_failures"] if m.split(".")[0] in ("hassod", "indexer", "retrieval")]
        result = (f"{info.get('gpu', 'CPU')}; torch {info['torch']}, torchvision {info['torchvision']}; "
                  f"{info['modules'] - len(project_failures)}/{info['modules']} project modules import")
        step.result = result
        if info["import_failures"]:
            raise StepError("imports failed:\n" + "\n".join(f"{k}: {v}" for k, v in info["import_failures"].items()))
        if dev.startswith("cuda") and not info["cuda_available"]:
            raise StepError("torch sees no CUDA device")
        return result

    check.step("env", "environment, versions, every project module imports", 120, env)

    # ---- data (no step of its own: the steps that need it fail with its error)
    try:
        halves = split_halves(data, work / "data", args.images or 10**6)
        state["halves"] = halves
        images_dir = halves["images"]
    except (OSError, StepError, ValueError, KeyError) as exc:
        state["data_error"] = f"the COCO128 copy ({data}): {exc}; run benchmarks/gpu/prepare.sh"
        images_dir = work / "data" / "images"

    if args.steps:  # a partial rerun (same --work) picks up what the earlier run left
        if all((work / f"pseudo_{p}.json").exists() for p in ("train", "heldout")):
            state["pseudo"] = {p: work / f"pseudo_{p}.json" for p in ("train", "heldout")}
        for key, path in (("real_model", work / "real" / "model_final.pth"),
                          ("speed_model", work / "speed" / "model_final.pth")):
            if path.exists():
                state[key] = path

    def need_data() -> dict:
        if "halves" not in state:
            raise StepError(state["data_error"])
        return state["halves"]

    # ---- infer
    def infer(step: Step, until: float) -> str:
        need_data()
        out = work / "infer.json"
        cmd = [PY, REPO / "benchmarks/gpu/bench_infer.py", "--images", images_dir, "--device", dev,
               "--batches", args.infer_batches, "--edge", args.infer_edge, "--count", args.infer_count,
               "--json-out", out] + (["--settings", "tiny"] if smoke else [])
        check.run("infer", cmd, until)
        result = json.loads(out.read_text())
        step.metrics = result
        return "; ".join(f"batch {r['batch']}: {r['forward_ms']:.1f} ms/img forward, {r['total_ms']:.1f} with "
                         f"post-processing ({r['detections_per_image']:.0f} dets/img"
                         + (f", peak {r['peak_mib']:.0f} MiB" if "peak_mib" in r else "") + ")"
                         for r in result["rows"]) + f" [{result['device']}, {result['edge']} px, {result['settings']} model]"

    check.step("infer", f"detector inference ms/img (random init, AMP on CUDA), batch {args.infer_batches.replace(',', ' and ')}",
               150, infer)

    # ---- faiss
    def faiss_step(step: Step, until: float) -> str:
        n_cpu = 20_000 if smoke else 200_000  # single CPU queries of 1M vectors take ~0.1 s each
        probe = textwrap.dedent(f"""
            import json, time
            import numpy as np
            import faiss
            from indexer.vectors import VectorStore
            gpus = faiss.get_num_gpus()
            rng = np.random.default_rng(0)
            n, d = (1_000_000 if gpus else {n_cpu}), 432
            x = rng.standard_normal((n, d), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            store = VectorStore.create(d, "flat")
            store.add(np.arange(n, dtype=np.int64), x)
            q = x[rng.choice(n, 1200, replace=False)] + 0.01 * rng.standard_normal((1200, d), dtype=np.float32)
            q /= np.linalg.norm(q, axis=1, keepdims=True)
            for i in range(5):
                store.search(q[i], 10)
            single = []
            for i in range(200):
                t = time.perf_counter(); store.search(q[i], 10); single.append(time.perf_counter() - t)
            t = time.perf_counter(); store.search(q[200:1200], 10); batch = time.perf_counter() - t
            print(json.dumps({{"gpus": gpus, "on_gpu": bool(store.info().get("gpu")), "n": n, "dim": d,
                              "single_p50_ms": 1000 * float(np.percentile(single, 50)),
                              "single_p95_ms": 1000 * float(np.percentile(single, 95)),
                              "batch1000_ms": 1000 * batch, "faiss": faiss.__version__}}))
        """)
        _, text = check.run("faiss", [PY, "-c", probe], until)
        r = check.last_json(text)
        step.metrics = r
        where = "GPU" if r["on_gpu"] else "CPU"
        line = (f"exact search of {r['n']:,} x {r['dim']}-d on the {where}: one query p50 {r['single_p50_ms']:.2f} ms, "
                f"p95 {r['single_p95_ms']:.2f} ms; 1000 queries {r['batch1000_ms']:.0f} ms")
        if not r["on_gpu"]:
            line = ("GPU FAISS not carried (the faiss-gpu 1.15.1 wheel is 129 MiB, faiss-gpu-cu12 1.14.1 46 MiB, and "
                    "both need CUDA 12's cuBLAS, 554 MiB, which this CUDA 13 image lacks: over the 64 MiB carry "
                    "limit); faiss-cpu " + r["faiss"] + ": " + line)
        return line

    check.step("faiss", "FAISS search latency (GPU when faiss is a GPU build)", 120, faiss_step)

    # ---- discover
    def discover(step: Step, until: float) -> str:
        halves = need_data()
        pseudo = work / "pseudo_all.json"
        for stale in (pseudo, Path(str(pseudo) + ".progress.jsonl")):
            stale.unlink(missing_ok=True)
        start = time.monotonic()
        _, text = check.run("discover", CLI + ["discover", images_dir, "--out", pseudo, "--device", dev,
                                               "--workers", args.workers, "--json"], until)
        wall = time.monotonic() - start
        summary = check.last_json(text)
        state["pseudo"] = split_pseudo(pseudo, work / "data", work)
        n = summary.get("images", 0)
        masks = summary.get("masks_per_level", [])
        step.metrics = {**summary, "wall_s": round(wall, 1)}
        return (f"{n} photos in {summary.get('seconds', 0):.1f} s = {n / max(summary.get('seconds', 1e-9), 1e-9):.2f} "
                f"images/s ({wall:.0f} s with start-up); masks per level {masks}; "
                f"train half {halves['train']}, held-out half {halves['heldout']}")

    check.step("discover", "stage-1 pseudo-labels of the photos (both halves)", 240, discover)

    def need_pseudo() -> dict[str, Path]:
        if "pseudo" not in state:
            raise StepError("no pseudo-labels: the discover step failed")
        return state["pseudo"]

    def train_cmd(run: Path, iterations: int, burn_in: int | None) -> list:
        warmup = max(1, min(1000, (burn_in if burn_in is not None else iterations) // 5))
        cmd = CLI + ["train", "--pseudo", need_pseudo()["train"], "--images", images_dir, "--out", run,
                     "--backbone", args.backbone, "--iterations", iterations, "--batch-size", args.batch_size,
                     "--device", dev, "--workers", args.workers, "--warmup", warmup,
                     "--checkpoint-period", max(iterations, 1), "--json"]
        if burn_in is not None:
            cmd += ["--burn-in", burn_in]
        return cmd

    def fresh(run: Path) -> Path:
        if run.exists():
            import shutil

            shutil.rmtree(run)
        return run

    skip = 5 if not smoke else 1

    # ---- speed: one short run through burn-in and Mean Teacher
    def rates_line(rates: dict) -> str:
        parts = []
        if rates.get("burnin_it_s"):
            parts.append(f"burn-in {rates['burnin_it_s']:.2f} it/s ({rates['burnin_iterations']} iterations)")
        if rates.get("mt_it_s"):
            parts.append(f"Mean Teacher {rates['mt_it_s']:.2f} it/s ({rates['mt_iterations']} iterations)")
        return ", ".join(parts) or "no iteration logged"

    def speed(step: Step, until: float) -> str:
        run = fresh(work / "speed")
        burn = skip + args.speed_iters
        start = time.monotonic()
        try:
            check.run("speed", train_cmd(run, 2 * burn, burn), until)
        finally:  # what was logged before a failure still gives the burn-in rate
            try:
                rates = log_rates(run, skip)
                step.metrics = {**rates, "wall_s": round(time.monotonic() - start, 1)}
                state["rate_burnin"] = rates.get("burnin_it_s")
                state["rate_mt"] = rates.get("mt_it_s")
                step.result = f"batch {args.batch_size}, {args.backbone}: {rates_line(rates)}"
            except (StepError, ValueError, OSError):
                pass
        if (run / "model_final.pth").exists():
            state["speed_model"] = run / "model_final.pth"
        if not step.metrics.get("mt_iterations"):
            raise StepError("no iteration logged alpha_label: no Mean Teacher phase ran")
        return (f"{step.result}; first {skip} of each phase left out; {step.metrics['wall_s']:.0f} s with start-up")

    check.step("speed", f"training it/s at batch {args.batch_size}, burn-in and Mean Teacher", 180, speed)

    # ---- the real run
    def real_train(step: Step, until: float) -> str:
        burn, mt = args.burn_in, args.mt
        rb = state.get("rate_burnin")
        rm = state.get("rate_mt") or (rb / 2.5 if rb else None)  # MT: teacher forward + two student batches
        note = ""
        if rb and rm:
            available = (until - time.monotonic()) - 45  # start-up, final checkpoint
            needed = (burn / rb + mt / rm) / 0.85  # data loading and logging on top of the step times
            if needed > available:
                scale = max(available, 0) / needed
                burn, mt = max(1, int(burn * scale)), max(1, int(mt * scale))
                note = f" (scaled from {args.burn_in} + {args.mt} to fit the time budget)"
        step.result = f"{burn} burn-in + {mt} MT iterations{note}"
        run = fresh(work / "real")
        start = time.monotonic()
        try:
            _, text = check.run("real_train", train_cmd(run, burn + mt, burn), until)
        except (StepError, subprocess.TimeoutExpired):
            with contextlib.suppress(StepError, ValueError, OSError):
                step.result += "; before it stopped: " + rates_line(log_rates(run, 0))
            raise
        rates = log_rates(run, 20 if not smoke else 0)
        summary = check.last_json(text)
        step.metrics = {**rates, "burn_in": burn, "mt": mt, "wall_s": round(time.monotonic() - start, 1),
                        "losses": summary.get("losses")}
        state["real_model"] = run / "model_final.pth"
        return (f"{burn} burn-in + {mt} MT iterations{note} at batch {args.batch_size} in "
                f"{step.metrics['wall_s']:.0f} s: burn-in {rates.get('burnin_it_s', float('nan')):.2f} it/s, "
                f"MT {rates.get('mt_it_s', float('nan')):.2f} it/s")

    limit = max(60.0, check.left() - args.reserve)
    check.step("real_train", "short real run on the train half: burn-in then Mean Teacher", limit, real_train)

    # ---- evaluations on the held-out half
    gt_heldout = work / "data" / "gt_heldout.json"

    def eval_pseudo(step: Step, until: float) -> str:
        pseudo = need_pseudo()["heldout"]
        _, text = check.run("eval_pseudo", CLI + ["eval", "--gt", gt_heldout, "--pred", pseudo, "--json",
                                                  "--max-detections", args.eval_max_detections], until)
        report = check.last_json(text)
        step.metrics = {k: report.get(k) for k in ("images", "detections", "bbox", "segm")}
        return f"stage-1 pseudo-labels: {ar_line(report, args.eval_max_detections > 100)}, at most {args.eval_max_detections} a photo)"

    check.step("eval_pseudo", "box AR of the pseudo-labels, held-out half", 90, eval_pseudo)

    def eval_model(use: str):
        def run_eval(step: Step, until: float) -> str:
            model = state.get("real_model")
            if model is None or not Path(model).exists():
                raise StepError("no trained model: the real_train step failed")
            cmd = CLI + ["eval", "--gt", gt_heldout, "--checkpoint", model, "--images", images_dir,
                         "--device", dev, "--batch-size", 8 if not smoke else 2, "--json",
                         "--max-detections", args.eval_max_detections]
            if use == "teacher":
                cmd += ["--use", "teacher"]
            _, text = check.run(f"eval_{use}", cmd, until)
            report = check.last_json(text)
            step.metrics = {k: report.get(k) for k in ("images", "detections", "bbox", "segm")}
            return f"{use}: {ar_line(report, args.eval_max_detections > 100)}, at most {args.eval_max_detections} a photo)"
        return run_eval

    check.step("eval_student", "box AR of the trained student, held-out half", 120, eval_model("student"))
    check.step("eval_teacher", "box AR of the Mean Teacher teacher, held-out half", 120, eval_model("teacher"))

    # ---- index build
    def index(kind: str):
        def build(step: Step, until: float) -> str:
            photos = need_data()["heldout_images"]
            folder = fresh(work / f"index_{kind}")
            cmd = CLI + ["index", "build", photos, "--index", folder, "--device", dev, "--json"]
            source = "stage-1 discovery"
            if kind == "detector":
                model = state.get("real_model")
                if model is None or not Path(model).exists():
                    model = state.get("speed_model")
                    if model is None or not Path(model).exists():
                        raise StepError("no trained model: real_train and speed failed")
                    source = "the speed run's detector (real run missing)"
                else:
                    source = "the real run's detector"
                cmd += ["--detector", model]
            else:
                cmd += ["--workers", args.workers]
            start = time.monotonic()
            _, text = check.run(f"index_{kind}", cmd, until)
            wall = time.monotonic() - start
            summary = check.last_json(text)
            n = summary.get("added", 0) + summary.get("updated", 0)
            step.metrics = {**summary, "wall_s": round(wall, 1)}
            return (f"{n} photos in {summary.get('seconds', 0):.1f} s = "
                    f"{n / max(summary.get('seconds', 1e-9), 1e-9):.2f} images/s ({wall:.0f} s with start-up), "
                    f"{summary.get('regions', 0) / max(n, 1):.1f} regions/photo from {source}")
        return build

    check.step("index_discovery", "`index build` of the held-out half, discovery regions", 120, index("discovery"))
    check.step("index_detector", "`index build` of the held-out half, trained detector's regions", 120,
               index("detector"))

    check.write()
    print("\n" + check.table())
    print(f"written: {check.outdir / 'gpu_check.md'}, gpu_check.json, gpu_check.log")
    bad = [s.name for s in check.steps if s.status in ("failed", "timeout")]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
