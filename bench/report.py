"""The benchmark's outputs: <stem>.json (everything measured), <stem>.md (the table) and <stem>.png (the chart),
plus the acceptance checks of issues 6 and 16 computed from the measured figures."""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

PHASES = ("feature_extraction", "fine_tuning")


def machine() -> dict[str, Any]:
    cpu = ""
    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not cpu:
                cpu = value.strip()
            if key.strip() == "flags" and not flags:
                flags = set(value.split())
    versions = {}
    for pkg in ("tensorflow", "tf-keras", "keras"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "avx512_bf16": "avx512_bf16" in flags,
            "python": platform.python_version(), **versions}


def _get(results: dict[str, Any], *path: str) -> Any:
    node: Any = results
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _check(value: Any, target: str, ok: bool | None) -> dict[str, Any]:
    return {"value": value, "target": target, "pass": ok}


def acceptance(results: dict[str, Any]) -> dict[str, Any]:
    """Issues 6 and 16's acceptance figures; `pass` is None where the section was not run. Binding in full mode."""
    ratio = results.get("recipe_time_ratio")
    acc = results.get("val_accuracy") or {}
    tl2, tu2 = _get(acc, "tljob", "fine_tuning"), _get(acc, "tutorial", "fine_tuning")
    ratios = _get(results, "pipeline", "ratios_to_ceiling") or {}
    out = {
        "recipe_time_ratio": _check(ratio, "<= 0.5", None if ratio is None else ratio <= 0.5),
        "val_accuracy_after_phase_2": _check({"tljob": tl2, "tutorial": tu2}, "tljob >= tutorial",
                                             None if tl2 is None or tu2 is None else tl2 >= tu2),
        "pipeline_cached_vs_ceiling": _check(
            {k: ratios.get(k) for k in ("tljob_cached_plain", "tljob_cached_augmented")}, ">= 3 (plain)",
            None if "tljob_cached_plain" not in ratios else ratios["tljob_cached_plain"] >= 3),
        "pipeline_first_epoch_vs_ceiling": _check(
            ratios.get("tljob_first_epoch"), ">= 0.8",
            None if "tljob_first_epoch" not in ratios else ratios["tljob_first_epoch"] >= 0.8),
        "mixed_precision": _check("not enabled by default", "no accuracy loss if enabled", True),
    }
    for phase in PHASES:
        eff = _get(results, "multiworker", phase, "weak_scaling_efficiency")
        out[f"weak_scaling_{phase}"] = _check(eff, ">= 0.85", None if eff is None else eff >= 0.85)
    # Issue 16: the fast config against the tutorial's code, the steps against the bare model, peak memory.
    fast = results.get("fast_time_ratio")
    out["fast_time_ratio"] = _check(fast, "<= 0.33", None if fast is None else fast <= 0.33)
    spread = results.get("val_accuracy_spread") or {}
    fa, ta = _get(spread, "fast", "median"), _get(spread, "tutorial", "median")
    out["fast_val_accuracy_median"] = _check({"fast": fa, "tutorial": ta}, "fast >= tutorial (medians over seeds)",
                                             None if fa is None or ta is None else fa >= ta)
    for phase in PHASES:
        ratio = _get(results, "step_over_floor", "tljob", phase)
        out[f"step_over_floor_{phase}"] = _check(ratio, "<= 1.15", None if ratio is None else ratio <= 1.15)
    memory = results.get("peak_memory_mb") or {}
    peak, bound = memory.get("tljob"), memory.get("tutorial_plus_cache_mb")
    out["peak_memory"] = _check({"tljob": peak, "tutorial_plus_cache": bound}, "tljob <= tutorial + decoded cache",
                                None if peak is None or bound is None else peak <= bound)
    return out


def summary_lines(results: dict[str, Any]) -> list[str]:
    acc = results.get("val_accuracy") or {}
    lines = [f"mode={results['mode']} load before={results['load_before']} after={results['load_after']}"]
    if "recipe" in results:
        med = results["recipe"]["median"]
        for key, who in (("recipe_time_ratio", "tljob"), ("fast_time_ratio", "fast")):
            if key in results:
                lines.append(f"{key}={results[key]} ({who} {med[who]['recipe_seconds']} s / tutorial "
                             f"{med['tutorial']['recipe_seconds']} s, median of rounds)")
        for who in med:
            lines.append(f"val_accuracy {who}: after phase 1 {_get(acc, who, 'feature_extraction')}, "
                         f"after phase 2 {_get(acc, who, 'fine_tuning')} (over seeds: "
                         f"{_get(results, 'val_accuracy_spread', who, 'runs')})")
    for name, check in results.get("acceptance", {}).items():
        lines.append(f"acceptance {name}: {check['value']} (target {check['target']}) pass={check['pass']}")
    return lines


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def markdown(results: dict[str, Any]) -> str:
    r = results
    out = [f"# Benchmark {r['date']} ({r['mode']} mode)", "",
           f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, TensorFlow {r['machine']['tensorflow']}, "
           f"tf-keras {r['machine']['tf-keras']}, Keras {r['machine']['keras']}. Load average (1, 5, 15 min) "
           f"before {r['load_before']}, after {r['load_after']}; {r['wall_seconds']} s in all.", ""]
    if "recipe" in r:
        med = r["recipe"]["median"]
        jobs = [w for w in med if w != "tutorial"]
        names = {"tljob": "tljob", "fast": "tljob fast config"}
        out += ["## Recipe end to end (median of rounds run alternately)", "",
                "| | tutorial code (Keras 3) | " + " | ".join(f"{names[w]} | / tutorial" for w in jobs) + " |",
                "|---|---|" + "---|---|" * len(jobs)]

        def row(label: str, *path: str) -> None:
            a = _get(med, "tutorial", *path)
            cells = []
            for w in jobs:
                b = _get(med, w, *path)
                ratio = b / a if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a else None
                cells += [_fmt(b), _fmt(ratio)]
            out.append(f"| {label} | {_fmt(a)} | " + " | ".join(cells) + " |")

        row("recipe wall time, s (start to last epoch)", "recipe_seconds")
        for p in PHASES:
            row(f"{p}: wall time, s", "phases", p, "seconds")
            row(f"{p}: images/s (training images / phase time)", "phases", p, "images_per_second")
            row(f"{p}: median step, ms", "phases", p, "step_ms_median")
            row(f"{p}: CPU cores used", "phases", p, "cpu_cores_used")
            row(f"{p}: validation accuracy (last epoch)", "phases", p, "val_accuracy")
        row("time to first training step, s", "first_step_seconds")
        row("CPU cores used (of the machine's)", "cpu_cores_used")
        row("peak memory, MB", "peak_memory_mb")
        row("process wall time, s (tljob also exports)", "process_seconds")
        out.append("")
        for key in ("recipe_time_ratio", "fast_time_ratio"):
            if key in r:
                out.append(f"{key} (median of per-round ratios {r['recipe'][key + '_per_round']}): **{r[key]}**  ")
        out += ["", "Validation accuracy after phase 2 over seeds (median, range):", ""]
        for w, sp in r.get("val_accuracy_spread", {}).items():
            out.append(f"- {w}: {_fmt(sp.get('median'))} ({_fmt(sp.get('min'))}-{_fmt(sp.get('max'))}), runs {sp['runs']}")
        out.append("")
    if "floor_step_ms" in r:
        floor = r["floor_step_ms"]
        out += ["## Step time against the bare model (bench/precision.py, float32, same machine, same run)", "",
                "| phase | bare model step, ms | " + " | ".join(f"{w}: median step ms (x floor)" for w in
                                                           r.get("step_over_floor", {})) + " |",
                "|---|---|" + "---|" * len(r.get("step_over_floor", {}))]
        for p in PHASES:
            cells = [f"{_fmt(_get(r, 'recipe', 'median', w, 'phases', p, 'step_ms_median'))} ({_fmt(ratios.get(p))})"
                     for w, ratios in r.get("step_over_floor", {}).items()]
            out.append(f"| {p} | {_fmt(floor[p])} | " + " | ".join(cells) + " |")
        out.append("")
    if r.get("peak_memory_mb"):
        m = r["peak_memory_mb"]
        out += ["## Peak memory to the end of the recipe, MB", "", "| tutorial | decoded cache | tutorial + cache | " +
                " | ".join(w for w in m if w not in ("tutorial", "decoded_cache_mb", "tutorial_plus_cache_mb")) + " |",
                "|---|---|---|" + "---|" * (len(m) - 3),
                f"| {_fmt(m['tutorial'])} | {_fmt(m['decoded_cache_mb'])} | {_fmt(m['tutorial_plus_cache_mb'])} | " +
                " | ".join(_fmt(v) for w, v in m.items() if w not in ("tutorial", "decoded_cache_mb",
                                                                      "tutorial_plus_cache_mb")) + " |", ""]
    if "pipeline" in r:
        p = r["pipeline"]
        out += ["## Input pipeline, images/s, no model (median of epochs after the first)", "",
                "| pipeline | images/s | / ceiling |", "|---|---|---|",
                f"| ceiling: decode_jpeg + resize, all cores | {_fmt(p['ceiling']['median'])} | 1 |",
                f"| tutorial: image_dataset_from_directory + prefetch | {_fmt(p['tutorial']['median'])} | "
                f"{_fmt(p['ratios_to_ceiling']['tutorial'])} |",
                f"| tljob first epoch (decode once into the cache) | {_fmt(p['tljob']['first_epoch']['median'])} | "
                f"{_fmt(p['ratios_to_ceiling']['tljob_first_epoch'])} |",
                f"| tljob cached epochs, no augmentation | {_fmt(p['tljob']['cached_plain']['median'])} | "
                f"{_fmt(p['ratios_to_ceiling']['tljob_cached_plain'])} |",
                f"| tljob cached epochs + flip/rotation (the tutorial does these in the model) | "
                f"{_fmt(p['tljob']['cached_augmented']['median'])} | "
                f"{_fmt(p['ratios_to_ceiling']['tljob_cached_augmented'])} |", ""]
    mw = r.get("multiworker")
    if mw and "skipped" not in mw:
        out += ["## Multi-worker, one core per worker, per-replica batch 32", "",
                "| phase | step ms, 1 worker | step ms, 2 workers | images/s 1 → 2 | weak-scaling efficiency (rounds) | "
                "all-reduce ms (parameters) |", "|---|---|---|---|---|---|"]
        for ph in (p for p in PHASES if p in mw):
            m = mw[ph]
            out.append(f"| {ph} | {_fmt(m['step_ms_1_worker'])} | {_fmt(m['step_ms_2_workers'])} | "
                       f"{_fmt(m['images_per_second_1_worker'])} → {_fmt(m['images_per_second_2_workers'])} | "
                       f"{_fmt(m['weak_scaling_efficiency'])} ({', '.join(map(_fmt, m['efficiency_per_round']))}) | "
                       f"{_fmt(m['allreduce_ms'])} ({m['gradient_parameters']}) |")
        out.append("")
    costs = r.get("job_costs")
    if costs:
        out += ["## Job costs", "", "| what | value |", "|---|---|",
                f"| time to first training step, tljob / tutorial, s | {_fmt(costs['first_step_seconds']['tljob'])} / "
                f"{_fmt(costs['first_step_seconds']['tutorial'])} |"]
        for ph, b in (costs["backup"] or {}).items():
            out.append(f"| backup per epoch, {ph}: s (share of the epoch) | {_fmt(b['backup_seconds'])} "
                       f"({b['share']:.1%}) |")
        pub = costs["publish"]
        out += [f"| publish the run to the GCS emulator ({pub['files']} files, {pub['megabytes']} MB), s | "
                f"{_fmt(pub['median_seconds'])} |", ""]
    out += ["## Acceptance (issues 6 and 16; binding in full mode)", "", "| check | value | target | pass |",
            "|---|---|---|---|"]
    for name, c in r["acceptance"].items():
        out.append(f"| {name} | {_fmt(c['value'])} | {c['target']} | {_fmt(c['pass'])} |")
    return "\n".join(out) + "\n"


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    ax = axes[0]
    if "recipe" in results:
        med = results["recipe"]["median"]
        whos = tuple(med)
        bottom = [0.0] * len(whos)
        startup = [med[w]["recipe_seconds"] - sum(med[w]["phases"][p]["seconds"] for p in PHASES) for w in whos]
        for label, values in (("start-up", startup),
                              *((p, [med[w]["phases"][p]["seconds"] for w in whos]) for p in PHASES)):
            ax.bar(whos, values, bottom=bottom, label=label)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_title("recipe wall time (ratios " + ", ".join(
            f"{k.split('_')[0]} {results[k]}" for k in ("recipe_time_ratio", "fast_time_ratio") if k in results) + ")")
        ax.set_ylabel("seconds")
        ax.legend()
    ax = axes[1]
    if "pipeline" in results:
        p = results["pipeline"]
        names = ["ceiling", "tutorial", "tljob 1st", "tljob cached", "tljob cached+aug"]
        values = [p["ceiling"]["median"], p["tutorial"]["median"], p["tljob"]["first_epoch"]["median"],
                  p["tljob"]["cached_plain"]["median"], p["tljob"]["cached_augmented"]["median"]]
        ax.bar(names, values, color=["grey", "tab:blue", "tab:orange", "tab:orange", "tab:orange"])
        ax.set_yscale("log")
        ax.set_title("input pipeline, images/s (no model)")
        ax.tick_params(axis="x", rotation=20)
    ax = axes[2]
    mw = results.get("multiworker")
    if mw and "skipped" not in mw:
        ran = [p for p in PHASES if p in mw]
        x = range(len(ran))
        ax.bar([i - 0.2 for i in x], [mw[p]["images_per_second_1_worker"] for p in ran], 0.4, label="1 worker")
        ax.bar([i + 0.2 for i in x], [mw[p]["images_per_second_2_workers"] for p in ran], 0.4, label="2 workers")
        ax.set_xticks(list(x), [f"{p}\neff {mw[p]['weak_scaling_efficiency']}" for p in ran])
        ax.set_title("multi-worker, 1 core each: images/s")
        ax.legend()
    fig.suptitle(f"tljob vs the tutorial's code — {results['date']} ({results['mode']} mode)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(results: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md", out_dir / f"{stem}.png"]
    paths[0].write_text(json.dumps(results, indent=1) + "\n")
    paths[1].write_text(markdown(results))
    chart(results, paths[2])
    return paths
