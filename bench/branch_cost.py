"""Benchmark of anneal-branch candidates: the compute they cost next to the loss they gain.

It measures and reports; nothing is asserted. ``gate.candidate: anneal_branch``
judges, at each judgement, a copy of the trunk annealed for
``schedule.anneal_steps`` steps (phase 4 of the infinite schedule) instead of
the trunk itself. Each judgement then costs ``anneal_steps`` extra optimizer
steps in a second learner: ``anneal_steps / gate.every_steps`` of the trunk's
compute when every judgement branches.

What is measured, per seed and per anneal length A
--------------------------------------------------
1. A trunk (a small Llama, 2 x 64, windows of 64 byte tokens, batch 8, a
   quarter replayed from a reservoir as the train stage mixes batches) trains
   on two domains interleaved (manual pages and Python sources, as the demo
   stream) through warmup, cooldown and into the constant phase, and is
   judged every ``--every`` steps; the trunk checkpoints of the judgements
   carry the anneal's batches exactly as the daemon writes them
   (``learners/branch.py``: the newest fresh windows the trunk trained on, the
   rest seeded replay).
2. At each judgement step S, the real ``BranchJob`` anneals a copy for A steps.
3. Held-out loss (documents of both domains the trunk never trains on) of the
   trunk at S, of the branch, and of the trunk at S + A, i.e. a trunk given the
   branch's compute on new data instead.

Reported: per A, the extra steps per judgement and their share of the trunk's
steps, the gain against the trunk at S (what a judgement of the trunk would
have judged: the promotion's quality) and against the trunk at S + A (the same
compute spent on the trunk), mean and spread over seeds and judgements.
"""

import argparse
import sys
import time
from pathlib import Path
from typing import Any
from uuid import uuid4

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import NO_PLOT, command_line, machine_info, pyplot, report, save_figure  # noqa: E402

SEQ, BATCH = 64, 8


def windows(docs, tok) -> np.ndarray:
    ids = np.concatenate([tok.encode(text) for _, text in docs])
    n = len(ids) // SEQ
    return ids[: n * SEQ].reshape(n, SEQ).astype(np.int32)


def held_out_loss(model, tokens: np.ndarray) -> float:
    from everlearn.learners.learner import sequence_losses

    sums, counts = sequence_losses(model, tokens, np.full(len(tokens), SEQ), 32)
    return float(sums.sum() / counts.sum())


def one_seed(seed: int, args, stream: np.ndarray, held: np.ndarray) -> list[dict[str, Any]]:
    """Train a trunk, judge it every ``args.every`` steps; at each judgement, branch for every A."""
    from everlearn.buffers import UniformReservoir
    from everlearn.learners.batching import ReplayMixer
    from everlearn.learners.branch import (
        BRANCH_DATA,
        BranchJob,
        FreshRing,
        anneal_batches,
        branches_url,
        encode_data,
    )
    from everlearn.learners.checkpoints import CheckpointStore
    from everlearn.learners.config import ModelConfig, TrainConfig
    from everlearn.learners.learner import Learner
    from everlearn.learners.schedules import ScheduleConfig

    model = ModelConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, max_position_embeddings=128, seed=seed)
    train = TrainConfig(seq_len=SEQ, batch_size=BATCH, torch_threads=args.threads, eval_batch_size=32, seed=seed)
    base = dict(peak_lr=3e-3, constant_lr=1e-3, min_lr=1e-4, warmup_steps=10, cooldown_steps=40)
    rows = stream[np.random.default_rng(seed).permutation(len(stream))]
    if len(rows) < (args.steps + max(args.anneal) + 1) * BATCH:
        raise SystemExit(f"{len(rows)} windows of text are too few for {args.steps + max(args.anneal)} steps; raise --bytes-per-domain")
    url = f"memory://branch-cost-{uuid4().hex}"
    learner = Learner(model, train, ScheduleConfig(**base, anneal_steps=max(args.anneal)), url)
    buffer = UniformReservoir(1024, SEQ, seed=seed)
    mixer = ReplayMixer(buffer, 0.25, BATCH)
    ring = FreshRing(max(args.anneal) * BATCH, SEQ)
    judgements = [s for s in range(args.every, args.steps + 1, args.every) if s >= 50 + args.every]  # constant phase only
    out, taken, pending = [], 0, {}
    for step in range(args.steps + max(args.anneal) + 1):  # the trunk goes on past the last judgement, for its S + A losses
        if step in judgements:
            refs = {}
            for a in args.anneal:  # one trunk checkpoint per anneal length: its batches are for a steps
                store_url = f"{url}/a{a}"
                learner.store = CheckpointStore(store_url)
                batches = anneal_batches(ring.rows(), buffer, [mixer.n_fresh(step + i) for i in range(a)], BATCH, (seed, step))
                files = learner.save(step)
                files[BRANCH_DATA] = learner.store.put(step, BRANCH_DATA, encode_data(step, BATCH, ring.rows(), batches))
                refs[a] = (store_url, learner.store.commit(step, files))
            pending[step] = {"trunk": held_out_loss(learner.model, held), "refs": refs, "later": {}}
        for s, p in pending.items():  # the trunk A steps after a judgement: the branch's compute spent on the trunk
            for a in args.anneal:
                if step == s + a:
                    p["later"][a] = held_out_loss(learner.model, held)
        n = mixer.n_fresh(step)
        fresh = rows[taken : taken + n]
        taken += n
        tokens, lengths, _ = mixer.mix(fresh)
        learner.train_step(tokens, lengths)
        mixer.remember(fresh, ["d"] * n, step)
        ring.add(fresh)
    for s, p in pending.items():
        for a in args.anneal:
            store_url, ref = p["refs"][a]
            job = BranchJob(model, train, ScheduleConfig(**base, anneal_steps=a), store_url, branches_url(store_url))
            t0 = time.perf_counter()
            job.run(ref.name)
            seconds = time.perf_counter() - t0
            branch = held_out_loss(job.learner.model, held)
            out.append({"seed": seed, "step": s, "anneal_steps": a, "trunk": p["trunk"], "branch": branch, "trunk_later": p["later"][a],
                        "branch_seconds": seconds})
    return out


def render(res: dict[str, Any]) -> str:
    every = res["setting"]["every"]
    lines = [f"Per judgement (every {every} trunk steps, {len(res['seed_values'])} seeds x {res['setting']['judgements']} judgements). "
             "Gain: held-out loss (nats/token) of the trunk minus the branch's; positive is better.", "",
             "| anneal steps A | extra steps per judgement | extra compute | branch wall time | gain vs trunk at S | "
             "gain vs trunk at S + A (same compute) | branch better than trunk at S |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for a in res["setting"]["anneal"]:
        rs = [r for r in res["runs"] if r["anneal_steps"] == a]
        g = np.array([r["trunk"] - r["branch"] for r in rs])
        gl = np.array([r["trunk_later"] - r["branch"] for r in rs])
        rel = np.mean([(r["trunk"] - r["branch"]) / r["trunk"] for r in rs])
        lines.append(f"| {a} | {a} | {a / every:.0%} | {np.median([r['branch_seconds'] for r in rs]):.1f} s | "
                     f"{g.mean():+.4f} ± {g.std():.4f} ({rel:+.1%}) | {gl.mean():+.4f} ± {gl.std():.4f} | {int((g > 0).sum())}/{len(g)} |")
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> str:
    plt = pyplot()
    if plt is None:
        return NO_PLOT
    fig, ax = plt.subplots(figsize=(7, 4))
    every = res["setting"]["every"]
    for key, label, marker in (("trunk", "vs the trunk at S (what would be judged)", "o"),
                               ("trunk_later", "vs the trunk at S + A (same compute on the trunk)", "s")):
        xs, ys, es = [], [], []
        for a in res["setting"]["anneal"]:
            gains = [r[key] - r["branch"] for r in res["runs"] if r["anneal_steps"] == a]
            xs.append(100 * a / every)
            ys.append(np.mean(gains))
            es.append(np.std(gains))
        ax.errorbar(xs, ys, yerr=es, marker=marker, capsize=3, label=label)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel(f"extra compute per judgement (% of the {every} trunk steps between judgements)")
    ax.set_ylabel("held-out loss gain of the branch (nats/token)")
    ax.set_title("Anneal branches: cost and gain")
    ax.legend(fontsize=8)
    return save_figure(plt, fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=300, help="trunk steps")
    p.add_argument("--every", type=int, default=50, help="trunk steps between judgements (gate.every_steps)")
    p.add_argument("--anneal", type=int, nargs="+", default=[10, 25, 50], help="anneal lengths to compare (schedule.anneal_steps)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--bytes-per-domain", type=int, default=260_000, help="text per domain (the trunk never trains a window twice)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 seed, two short anneals, little text")
    p.add_argument("--out", type=Path, default=None, help="write branch_cost.md/.json/.png here (e.g. docs/bench)")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.every, args.anneal = 1, 80, 20, [2, 4]
    import torch

    from everlearn.daemon import demo
    from everlearn.learners.config import ModelConfig
    from everlearn.learners.model import build_tokenizer

    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    tok = build_tokenizer(ModelConfig())
    per_domain = 60_000 if args.quick else args.bytes_per_domain
    domains = [demo.take(demo.man_pages(), per_domain), demo.take(demo.python_sources(), per_domain)]
    stream = np.concatenate([windows(d[:-12], tok) for d in domains])
    held = np.concatenate([windows(d[-12:], tok) for d in domains])
    seed_values = list(range(args.seeds))
    judgements = len([s for s in range(args.every, args.steps + 1, args.every) if s >= 50 + args.every])
    res: dict[str, Any] = {"command": command_line(), "quick": args.quick, "seed_values": seed_values,
                           "machine": machine_info(torch=torch.__version__),
                           "setting": {"steps": args.steps, "every": args.every, "anneal": args.anneal, "judgements": judgements,
                                       "held_out_sequences": len(held), "stream_windows": len(stream)}}
    res["runs"] = [r for s in seed_values for r in one_seed(s, args, stream, held)]
    report(res, args.out, "branch_cost", title="Anneal branches: compute cost and loss gain",
           intro="", versions={"torch": "torch"},
           setting=f"Trunk {args.steps} steps, a judgement every {args.every} in the constant phase, {len(held)} held-out sequences. ",
           render=render, plot=plot, image_alt="held-out loss gain of the branch against its extra compute",
           raw_note=" (every judgement)", t_start=t0)
    return res


if __name__ == "__main__":
    main()
