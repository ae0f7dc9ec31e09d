"""Why a plan: the candidates EPP's search tried, what each reached, and why the winner won."""
from __future__ import annotations

from typing import Any

from ..contract.ir import Plan


def explain_lines(plan: Plan) -> list[str]:
    """Readable lines from ``plan.metadata["search"]`` (EPP planners record it; others do not)."""
    return explain_metadata(plan.metadata)


def explain_metadata(meta: dict[str, Any]) -> list[str]:
    """The same lines from a search's record: a plan's metadata, or a `NoPlanError`'s when no
    candidate fits."""
    trials = meta.get("search")
    if trials == []:
        return [f"{meta.get('planner', 'epp')}: no candidate tried: the budget is under what any plan of the batch "
                f"needs ({meta['memory_lower_bound'] / 2**30:.2f} GiB per device)"]
    if not trials:
        return [f"{meta.get('planner', 'this planner')}: no candidate search to explain "
                "(only the epp planners search; the baselines fix their chunking and recompute)"]
    chosen = meta.get("chosen")
    fits = [t for t in trials if t.get("feasible")]
    best = min((t["iteration_time_s"] for t in fits), default=None)
    marked = False  # the chosen plan is the trial of that candidate with its simulated time
    lines = [f"{len(trials)} candidate plans tried ({len(fits)} fit); SIMULATED iteration times",
             f"  {'candidate':<28} {'pass':<6} {'iteration':>10} {'vs best':>8} {'bubble':>7} "
             f"{'recompute':>10} {'chunks':>6} {'pipes':>5}  note"]
    for t in sorted(trials, key=lambda t: (not t.get("feasible"), t.get("iteration_time_s", 0.0))):
        if t.get("feasible"):
            line = (f"  {t['candidate']:<28} {'screen' if t['screened'] else 'full':<6} {t['iteration_time_s']:>9.2f}s "
                    f"{t['iteration_time_s'] / best:>7.3f}x {t['bubble_ratio']:>6.1%} {t['recompute_s']:>9.2f}s "
                    f"{t['num_chunks']:>6} {t['num_pipelines']:>5}")
            is_chosen = not marked and t["candidate"] == chosen and t["iteration_time_s"] == meta.get("iteration_time_s")
            marked = marked or is_chosen
            note = "<- chosen" if is_chosen else ""
            if t.get("checkpointing_kind") == "uniform":
                note = (note + " uniform recompute").strip()
        else:
            line = f"  {t['candidate']:<28} {'screen' if t['screened'] else 'full':<6} {'-':>10}"
            note = t.get("error", "does not fit")
        lines.append(f"{line}  {note}")
    for s in meta.get("search_skipped", []):
        lines.append(f"  {s['candidate']:<28} {'-':<6} {'-':>10}  not planned: lines through the K ladder's rungs "
                     f"(time taken as convex in log K) put it at {s['floor_s']:.2f}s or more, no faster than "
                     f"{s['leader']} ({s['leader_s']:.2f}s)")
    skipped = meta.get("skipped_for_time", [])
    if skipped:
        lines.append(f"  not planned for time ({len(skipped)}): the planning deadline of {meta['deadline_s']:.2f}s "
                     f"(MEASURED wall time) had passed, or would have before they finished: {', '.join(skipped)}")
    elif meta.get("deadline_s") is not None:
        lines.append(f"  the search ended before its deadline of {meta['deadline_s']:.2f}s")
    lines.append(f"chosen: {chosen}: the fastest plan that fits the memory budget in simulation"
                 if chosen else "no candidate fits")
    lines += host_tier_lines(meta)
    return lines


def host_tier_lines(meta: dict[str, Any]) -> list[str]:
    """What the chosen plan keeps on the host, per stage (plans made with a host tier)."""
    if not meta.get("host_memory_budget"):
        return []
    moved, exposed = meta.get("offloaded_bytes") or [], meta.get("exposed_copy_s") or []
    where = "waits on the host during the step" if meta.get("offload_optimizer") else "stays on the device"
    waiting = [s for s, wait in enumerate(meta.get("optimizer_out_wait") or []) if wait]
    if waiting:
        where += f" (stages {', '.join(map(str, waiting))} start once its copy out has ended)"
    lines = [f"host tier ({meta['host_memory_budget'] / 2**30:.0f} GiB per device): the optimizer state {where}"]
    lines += [f"  stage {s}: {b / 2**30:.1f} GiB of saved activations offloaded, {e:.3f}s waited for copies back"
              for s, (b, e) in enumerate(zip(moved, exposed))]
    return lines
