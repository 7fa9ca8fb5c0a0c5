"""Streamed vs in-memory weight matching on LLaMA-shaped checkpoints: one sweep's wall time and peak RSS.

For each size the script writes two checkpoints to ``benchmarks/_cache/big_models/<size>/`` (bf16,
tensor by tensor through permerge's planned writer, so generating never holds a whole model):
A is random-init (N(0, 0.02) weights, unit norms) and B is A with a planted random permutation
plus N(0, 0.01) noise ("two fine-tunes of one base, one of them permuted"). Then, each in a fresh
subprocess so peak RSS (VmHWM) is per configuration:

* ``stream``: :func:`permerge.match.stream.stream_weight_matching` over ``open_checkpoint(mmap=False)`` sources;
* ``check``: the streamed function check every ``align_hf`` run makes
  (:func:`permerge.align_hf.prepare_check`: A's architecture on the meta device, traced; then the
  program run with B's tensors and with them permuted, each read lazily), timed in its parts;
* ``memory``: both checkpoints loaded (bf16) and :func:`permerge.match.weight_matching`;
* ``floor``: only the cost matmuls (float32, inputs already in RAM and in unit-row layout) and the
  LAP solves of one sweep, group by group.

Every matcher runs ``max_sweeps=1`` (its start, signature match included, counts). Usage::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/big_models.py --sizes 125M,350M,1B [--device cuda] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / "_cache" / "big_models"
RESULTS = ROOT / "results" / "big_models.md"

SIZES = {  # LLaMA-shaped, GQA with 4 KV heads, untied embeddings, vocab 32000
    "125M": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12),
    "350M": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16),
    "1B": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32),
    "7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
}


def _config(size: str):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=32000, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"], dtype="bfloat16", **SIZES[size],
    )  # fmt: skip


def _spec(size: str, keys=None):
    """The traced spec (checkpoint keys) of a LLaMA of ``size``, built on the meta device."""
    import transformers

    from permerge.graph import trace
    from permerge.hf import checkpoint_spec

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM._from_config(_config(size))
    model.eval()
    spec = trace(model, (torch.zeros(1, 16, dtype=torch.long, device="meta"),), example_kwargs={"use_cache": False})
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return checkpoint_spec(spec, model, keys or shapes), shapes


def generate(size: str) -> Path:
    """Write A and B for ``size`` (skipped when present); returns the size's cache directory."""
    from permerge.apply import permute_tensor
    from permerge.io.write import ShardPlan, WriteJob, write_shard
    from permerge.permutation import random_permutation

    d = CACHE / size
    if (d / "b" / "model.safetensors").is_file():
        return d
    spec, shapes = _spec(size)
    planted = random_permutation(spec, seed=1)
    jobs = tuple(WriteJob(k, s, torch.bfloat16, spec.axes_of(k)) for k, s in shapes.items())
    cfg = _config(size)

    def weight(job: WriteJob) -> torch.Tensor:
        gen = torch.Generator().manual_seed(list(shapes).index(job.key))
        if job.key.endswith("norm.weight"):
            return torch.ones(job.shape)
        return torch.randn(job.shape, generator=gen) * 0.02

    def a(job: WriteJob) -> torch.Tensor:
        return weight(job).to(torch.bfloat16)

    def b(job: WriteJob) -> torch.Tensor:
        gen = torch.Generator().manual_seed(10**6 + list(shapes).index(job.key))
        w = permute_tensor(weight(job), job.axes, planted)
        return (w + 0.01 * torch.randn(job.shape, generator=gen)).to(torch.bfloat16)

    for name, produce in (("a", a), ("b", b)):
        (d / name).mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(d / name)
        tmp = d / name / "model.safetensors.tmp"
        write_shard(tmp, ShardPlan("model.safetensors", jobs), produce)
        tmp.rename(d / name / "model.safetensors")
    (d / "spec.json").write_text(spec.to_json())
    return d


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmHWM", "VmRSS"):
            out[k] = int(v.split()[0]) * 1024
    return out


def child(mode: str, size: str, device: str | None, workers: int) -> dict:
    """One configuration, in this (fresh) process; returns seconds, peak RSS and details."""
    from permerge.io.read import load_state_dict, open_checkpoint
    from permerge.match import lap, weight_matching
    from permerge.match.stream import stream_weight_matching
    from permerge.match.weight import _f32, _signature, _unit_rows
    from permerge.spec import PermutationSpec

    d = CACHE / size
    spec = PermutationSpec.from_json((d / "spec.json").read_text())
    base = _status()["VmRSS"]
    out: dict = {"mode": mode, "size": size, "device": device or "cpu", "workers": workers, "base_rss": base}
    t0 = time.perf_counter()
    if mode == "check":  # what align_hf adds to a run: the streamed function check (its trace gives the spec too)
        from permerge.align_hf import prepare_check
        from permerge.permutation import inverse, random_permutation

        with open_checkpoint(d / "b", mmap=False) as sb:
            spec_b, check = prepare_check(d / "a", sb)
            out["trace_seconds"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            check.reference()
            out["reference_seconds"] = time.perf_counter() - t1
            t1 = time.perf_counter()
            report = check.verify(inverse(random_permutation(spec_b, seed=1)))  # the planted permutation, undone
            out["verify_seconds"] = time.perf_counter() - t1
        out["seconds"] = out["reference_seconds"] + out["verify_seconds"]
        out["relative_error"] = report.relative_error
        res = None
    elif mode == "stream":
        with open_checkpoint(d / "a", mmap=False) as sa, open_checkpoint(d / "b", mmap=False) as sb:
            res = stream_weight_matching(spec, sa, sb, max_sweeps=1, quiet=True, device=device, workers=workers)
        out["seconds"] = time.perf_counter() - t0
    elif mode == "memory":
        sd_a, sd_b = load_state_dict(d / "a"), load_state_dict(d / "b")
        out["load_seconds"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        res = weight_matching(spec, sd_a, sd_b, max_sweeps=1, quiet=True, device=device, workers=workers)
        out["seconds"] = time.perf_counter() - t1
    else:  # floor: the run's LAP solves and one sweep's cost matmuls, inputs prepared outside the clock
        dev = torch.device(device or "cpu")
        mm = lp = sig = 0.0
        laps: list[list[float]] = []  # per group: n, start LAP s, sweep LAP s
        with open_checkpoint(d / "a", mmap=False) as sa, open_checkpoint(d / "b", mmap=False) as sb:
            shapes = {k: tuple(sa.shape(k)) for k in sa.keys()}  # noqa: SIM118
            for g in spec.groups:
                if g.size == 1:
                    continue
                # the signature start's LAP (features computed outside the clock)
                fa = _signature(g, {k: sa.get(k) for k in {ax.key for ax in g.members}})
                fb = _signature(g, {k: sb.get(k) for k in {ax.key for ax in g.members}})
                t = time.perf_counter()
                lap.solve(-torch.cdist(fa.double(), fb.double()).square())
                sig += time.perf_counter() - t
                laps.append([g.size, time.perf_counter() - t])
                cost = torch.zeros(g.size, g.size, device=dev)
                for ax in g.members:
                    a = _f32(_unit_rows(sa.get(ax.key).to(dev), ax, g.size)).contiguous()
                    b = _f32(_unit_rows(sb.get(ax.key).to(dev), ax, g.size)).contiguous()
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    t = time.perf_counter()
                    cost.addmm_(a, b.T)
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    mm += time.perf_counter() - t
                    del a, b
                t = time.perf_counter()
                host = cost.cpu()
                lap.solve(host)
                lp += time.perf_counter() - t
                laps[-1].append(time.perf_counter() - t)
        flops = sum(2 * g.size * sum(math.prod(shapes[ax.key]) for ax in g.members) for g in spec.groups if g.size > 1)
        out.update(seconds=mm + lp + sig, matmul_seconds=mm, lap_seconds=lp, start_lap_seconds=sig, laps=laps, flops=flops)
        res = None
    if res is not None:
        out.update(total_before=res.total_before, total_after=res.total_after, sweeps=res.sweeps)
        out["recovered"] = _recovered(spec, res.permutation)
    out["peak_rss"] = _status()["VmHWM"]
    return out


def _recovered(spec, perm) -> bool:
    """Whether the permutation found undoes the planted one exactly (B = planted·A + noise)."""
    from permerge.permutation import inverse, random_permutation

    planted = inverse(random_permutation(spec, seed=1))
    return all(torch.equal(perm[g], planted[g]) for g in perm)


def _role(group: str) -> str:
    """A group's role: its name with the layer index dropped (``model.layers.*.mlp...``)."""
    import re

    return re.sub(r"\.\d+\.", ".*.", group)


def extrapolate(rows: list[dict], target: str = "7B") -> str:
    """Estimate one streamed sweep at ``target`` from the largest measured CPU size's per-unit costs.

    Matmuls scale with FLOPs (exact, from the traced ``target`` spec) at the measured rate; LAPs with
    a power law ``t = c·n^k`` fitted over every measured group (n ≥ 256); the streamed overhead
    beyond the floor (reads, upcasts, gathers) with the bytes on disk; the RSS above the interpreter
    with the larger of the biggest float32 tensor and a float32 + float64 copy of the biggest cost.
    """
    floors = [r for r in rows if r["mode"] == "floor" and r["device"] == "cpu" and "laps" in r]
    streams = {r["size"]: r for r in rows if r["mode"] == "stream" and r["device"] == "cpu" and r["workers"] == 1}
    if not floors:
        return "no CPU floor measured: no extrapolation"
    ref = max((r for r in floors if r["size"] in streams), key=lambda r: r["disk_bytes"])
    st = streams[ref["size"]]
    spec, shapes = _spec(target)
    flops = sum(2 * g.size * sum(math.prod(shapes[ax.key]) for ax in g.members) for g in spec.groups if g.size > 1)
    # LAPs: each target group scaled from the measured group of the same role (layer index dropped)
    # by (n_target / n_measured)^3, LAPJV's worst case; the start's and the sweep's separately
    ref_groups = [g for g in json.loads((CACHE / ref["size"] / "spec.json").read_text())["groups"] if g["size"] > 1]
    by_role: dict[str, list[tuple[int, float, float]]] = {}
    for g, (n, t0, t1) in zip(ref_groups, ref["laps"], strict=True):
        by_role.setdefault(_role(g["name"]), []).append((n, t0, t1))
    laps = 0.0
    for g in spec.groups:
        if g.size > 1:
            meas = by_role[_role(g.name)]
            n0 = meas[0][0]
            laps += sum(t0 + t1 for _, t0, t1 in meas) / len(meas) * (g.size / n0) ** 3
    matmul = flops / (ref["flops"] / ref["matmul_seconds"])
    disk = sum(math.prod(s) * 2 for s in shapes.values())
    overhead = max(st["seconds"] - ref["seconds"], 0.0) / ref["disk_bytes"] * disk
    n_max = max(g.size for g in spec.groups)
    big = lambda shp, n: max(max(math.prod(s) for s in shp.values()) * 4, 12 * n * n)  # noqa: E731
    ref_spec = json.loads((CACHE / ref["size"] / "spec.json").read_text())
    ref_n = max(g["size"] for g in ref_spec["groups"])
    _, ref_shapes = _spec(ref["size"])  # from the config on the meta device: no checkpoint needed
    rss = st["base_rss"] + (st["peak_rss"] - st["base_rss"]) * big(shapes, n_max) / big(ref_shapes, ref_n)
    return (
        f"Extrapolated to a LLaMA-{target} shape (4096 hidden, 11008 MLP, 32 layers, bf16 {disk / 1e9:.1f} GB on disk, "
        f"fp32 {2 * disk / 1e9:.1f} GB) from the {ref['size']} measurements on this CPU: one streamed sweep ≈ "
        f"{(matmul + laps + overhead) / 60:.0f} min on 2 cores: cost matmuls {flops / 1e12:.0f} TFLOP ≈ {matmul / 60:.0f} min at the "
        f"measured {ref['flops'] / ref['matmul_seconds'] / 1e9:.0f} GFLOP/s (an estimate, not measured here: a GPU would take seconds); "
        f"LAPs ≈ {laps / 60:.0f} min, each group's measured time scaled by n³ (start and sweep; `--workers` divides "
        f"the per-layer ones among cores); streaming overhead ≈ {overhead / 60:.1f} min (stream − floor, scaled by bytes; "
        f"reads, upcasts, signatures and objective passes). Peak RSS ≈ {rss / 2**30:.1f} GiB = {rss / (2 * disk):.2f}× the fp32 model "
        f"(the {ref['size']} excess over the interpreter scaled by max(largest fp32 tensor, 12·n_max²))."
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="125M,350M,1B")
    p.add_argument("--device", default=None)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--modes", default="stream,memory,floor,check")
    p.add_argument("--repeats", type=int, default=1, help="runs per configuration (the median is kept, all are listed)")
    p.add_argument("--report", action="store_true", help="only print the table from the stored measurements")
    p.add_argument("--child", nargs=2, metavar=("MODE", "SIZE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.device, args.workers)))
        return
    raw = ROOT / "results" / "big_models.raw.json"
    stored = json.loads(raw.read_text()) if raw.is_file() else []
    rows = []
    for size in [] if args.report else args.sizes.split(","):
        t = time.perf_counter()
        d = generate(size)
        gen_s = time.perf_counter() - t
        disk = sum(f.stat().st_size for f in (d / "a").glob("*.safetensors"))
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, "--child", mode, size, "--workers", str(args.workers)]
            cmd += ["--device", args.device] if args.device else []
            runs = []
            for _ in range(args.repeats):
                r = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if r.returncode:
                    sys.stderr.write(r.stderr[-3000:])
                    raise SystemExit(f"{mode} {size} failed")
                runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
            row = sorted(runs, key=lambda x: x["seconds"])[len(runs) // 2]  # the median run
            row.update(disk_bytes=disk, fp32_bytes=2 * disk, generate_seconds=gen_s, threads=torch.get_num_threads(),
                       measured=time.strftime("%Y-%m-%d %H:%M"), runs=[x["seconds"] for x in runs])  # fmt: skip
            rows.append(row)
            sys.stderr.write(json.dumps(row) + "\n")
    # keep earlier measurements of other configurations (one row per size, mode, device, workers)
    ident = lambda r: (r["size"], r["mode"], r["device"], r["workers"])  # noqa: E731
    fresh = {ident(r) for r in rows}
    rows = [r for r in stored if ident(r) not in fresh] + rows
    rows.sort(key=lambda r: (float(r["size"][:-1]) * (1000 if r["size"].endswith("B") else 1), r["device"], r["mode"]))
    (ROOT / "results").mkdir(exist_ok=True)
    raw.write_text(json.dumps(rows, indent=1))
    table, note = _table(rows), extrapolate(rows)
    print(table)
    print()
    print(note)
    RESULTS.write_text(_markdown(table, note, rows), encoding="utf-8")


def _markdown(table: str, note: str, rows: list[dict]) -> str:
    import platform

    devices = sorted({r["device"] for r in rows})
    return f"""# Big models: streamed vs in-memory weight matching (one sweep), and the streamed function check

Written by `benchmarks/big_models.py` ({platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs,
torch {torch.__version__}; devices measured: {", ".join(devices)}). No GPU was lent to this task, so
there are no `--device cuda` rows; on a GPU box run the command below with `--device cuda`.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/big_models.py --sizes 125M,350M,1B   # + --device cuda, --workers N, --modes
    python benchmarks/big_models.py --report                                     # reprint from stored rows

Models: LLaMA-shaped (GQA, 4 KV heads, vocab 32000, untied), written by the script in **bf16**
tensor by tensor: A random-init, B = A with a planted permutation + N(0, 0.01) noise. Each
configuration runs in a fresh subprocess; peak RSS is its VmHWM (it includes the interpreter with
torch and permerge imported, ~0.22 GiB, and, for `memory`, the memory-mapped checkpoint pages).
`stream` = `stream_weight_matching` over `open_checkpoint(mmap=False)` sources (pread, no mmap); `memory` = both
checkpoints loaded + `weight_matching`; `floor` = only the LAP solves the run makes (the signature
start's and the sweep's) plus the sweep's cost matmuls, with inputs prepared outside the clock.
All use `max_sweeps=1`. `check` = the streamed function check `align_hf` runs on every alignment
(`prepare_check`, then B's program run once with B's tensors and once with them permuted, each tensor
read at its use): its seconds are the two runs (the trace it starts from also yields the spec, so a
run pays it anyway; listed in the notes), its peak RSS is that process's, trace included. `cpu ×2` = `--workers 2` (LAPs of independent groups in two threads; no faster on
these 2 cores, where torch's matmuls use both). Runs vary on this shared box: the 1B stream took 367 s
with another job running and 304 s alone, and its peak RSS was 1.20 / 1.78 / 1.36 GiB in three runs;
rows with a "measured" note are from the latest run (with its thread count), the others from earlier
sessions, so compare the check with the stream row of the same run (the findings below do).

{table}

{note}

{_findings(rows)}"""


def _findings(rows: list[dict]) -> str:
    """Derived remarks: what dominates the floor, streamed RSS vs the target, the check's cost, sizes not measured."""
    out = []
    sweeps = {(r["size"], r["device"]): r["seconds"] for r in rows if r["mode"] == "stream" and r["workers"] == 1}
    for r in rows:
        if r["mode"] == "check" and (r["size"], r["device"]) in sweeps:
            sweep = sweeps[r["size"], r["device"]]
            out.append(
                f"- {r['size']} streamed function check: {r['seconds']:.1f} s = {r['seconds'] / sweep:.1%} of one streamed "
                f"sweep ({sweep:.1f} s; target ≤ 10 %), peak RSS {r['peak_rss'] / r['fp32_bytes']:.2f}× the fp32 model "
                f"(target ≤ 0.5×), relative error {r['relative_error']:.1e}."
            )
    for r in rows:
        if r["mode"] == "floor" and "start_lap_seconds" in r:
            out.append(f"- {r['size']}: the signature start's LAPs are {r['start_lap_seconds'] / r['seconds']:.0%} of the floor.")
    for r in rows:
        if r["mode"] == "stream":
            out.append(
                f"- {r['size']} streamed{' (workers ' + str(r['workers']) + ')' if r['workers'] > 1 else ''}: peak RSS {r['peak_rss'] / r['fp32_bytes']:.2f}× the fp32 model "
                f"({(r['peak_rss'] - r['base_rss']) / r['fp32_bytes']:.2f}× above the interpreter's own "
                f"{r['base_rss'] / 2**30:.2f} GiB); target ≤ 0.5× at 1B."
            )
    if not any(r["size"] == "1B" for r in rows):
        out.append(
            "- 1B was not measured: one 350M configuration takes ~5 min on this shared 2-core box and a 1B one "
            "~4× that, which did not fit the session; `--sizes 1B` runs it (needs ~9 GB RAM for `memory`)."
        )
    return "\n".join(out) + "\n"


def _table(rows: list[dict]) -> str:
    head = (
        "| size | mode | device | s / sweep | × floor | peak RSS | ÷ model on disk (bf16) | ÷ model fp32 | notes |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---|"
    )
    floors = {(r["size"], r["device"]): r["seconds"] for r in rows if r["mode"] == "floor"}
    lines = [head]
    for r in rows:
        fl = floors.get((r["size"], r["device"]))
        note = []
        if r["mode"] == "memory":
            note.append(f"+{r['load_seconds']:.1f} s to load both")
        if r["mode"] == "floor":
            note.append(
                f"start LAPs {r['start_lap_seconds']:.1f} s + sweep matmuls {r['matmul_seconds']:.1f} s "
                f"+ sweep LAPs {r['lap_seconds']:.1f} s"
            )
        if len(r.get("runs", ())) > 1:
            note.append(f"median of {len(r['runs'])} runs: {', '.join(f'{x:.1f}' for x in sorted(r['runs']))} s")
        if "measured" in r:
            note.append(f"measured {r['measured']}, {r['threads']} threads")
        if r["mode"] == "check":
            note.append(
                f"B {r['reference_seconds']:.1f} s + B permuted {r['verify_seconds']:.1f} s "
                f"(+ trace {r['trace_seconds']:.1f} s, which also gives the spec); rel. error {r['relative_error']:.1e}"
            )
        if "recovered" in r:
            note.append("planted perm recovered" if r["recovered"] else "planted perm NOT recovered")
        lines.append(
            f"| {r['size']} | {r['mode']} | {r['device']}{' ×' + str(r['workers']) if r['workers'] > 1 else ''} "
            f"| {r['seconds']:.1f} | {r['seconds'] / fl:.2f} | {r['peak_rss'] / 2**30:.2f} GiB "
            f"| {r['peak_rss'] / r['disk_bytes']:.2f} | {r['peak_rss'] / r['fp32_bytes']:.2f} | {'; '.join(note)} |"
            if fl
            else f"| {r['size']} | {r['mode']} | {r['device']} | {r['seconds']:.1f} | – | {r['peak_rss'] / 2**30:.2f} GiB | | | |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
