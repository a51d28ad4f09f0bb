"""Benchmark of the gates' quality: how often each gate passes a good candidate and refuses a poisoned one, over seeds.

It measures and reports; nothing is asserted. The verdicts come from the real
``Evaluator.judge`` (deploy/evaluator.py) with the default ``GateConfig`` except
what the small model needs (below), on held-out windows built by the daemon's
own ``HoldoutWindows`` (daemon/holdout.py: the hash of the text decides what is
held out; fresh window, per-domain old reservoirs, frozen probes).

What is measured, per seed
--------------------------
1. ``serving``: a small Llama (2 x 64, context 128, windows of 64 tokens,
   batch 8, LR 3e-3 constant) trained ``--serving-steps`` steps on manual pages
   cut into ~500-character documents; their held-out share fills the windows.
   Version 0 (the untrained weights) is the anchor, as in a new run.
2. Each candidate continues from ``serving`` for ``--candidate-steps`` steps on
   its own stream, with a quarter of every batch replayed from serving's
   training windows (the daemon's default replay share), and its stream's
   held-out documents enter a copy of the windows (so its fresh window is its
   own stream, and its old documents age into the old reservoirs, as in a run):

   ``good: more manual pages``      unseen manual pages (same domain)
   ``good: a new domain``           Python sources (domain ``python``)
   ``poison: ROT13 manual pages``   unseen manual pages in ROT13, claiming the domain ``manpages``
   ``poison: random characters``    random printable ASCII, claiming ``manpages``
   ``poison: spam``                 bursts of 1-3 letters repeated, claiming ``manpages``
   ``poison: NaN weight``           the first good candidate with one weight set to NaN

3. ``Evaluator.judge(candidate, serving, evidence, anchor=v0)``: the verdict
   and each gate's pass/fail (every gate after sanity is evaluated and recorded
   even when an earlier one failed).

The seed changes the documents' order (so which ones are held out, trained and
replayed), the model's initialisation and the sampling of batches.
GateConfig: defaults, except ``min_fresh_tokens`` 500 and ``probe_sequences``
32: a 64-token window holds a quarter of what the default 256 does.
"""

import argparse
import codecs
import copy
import sys
import time
from pathlib import Path
from typing import Any
from uuid import uuid4

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import NO_PLOT, command_line, machine_info, pyplot, report, save_figure  # noqa: E402

KINDS = ("good: more manual pages", "good: a new domain", "poison: ROT13 manual pages", "poison: random characters",
         "poison: spam", "poison: NaN weight")
GATES = ("sanity", "improvement", "forgetting", "anchor", "behaviour", "generation")
SEQ, BATCH, REPLAY = 64, 8, 2  # replay rows of 8: the daemon's default share (buffer.replay_fraction 0.25)


def pieces(docs, size: int = 500) -> list[str]:
    return [text[i : i + size] for _, text in docs for i in range(0, len(text), size) if len(text[i : i + size]) > 50]


def streams(rng: np.random.Generator, quick: bool) -> dict[str, tuple[str, list[str]]]:
    from everlearn.daemon import demo

    scale = 4 if quick else 1
    man = pieces(demo.take(demo.man_pages(), 240_000 // scale))
    rng.shuffle(man)
    half = len(man) // 2
    py = pieces(demo.take(demo.python_sources(), 60_000 // scale))
    rng.shuffle(py)
    n = len(man) - half
    random_text = ["".join(map(chr, rng.integers(0x21, 0x7F, 500))) for _ in range(n)]
    spam = []
    for _ in range(n):
        burst = "".join(map(chr, rng.integers(0x41, 0x5B, int(rng.integers(1, 4)))))
        spam.append((burst * 500)[:500])
    return {"serving": ("manpages", man[:half]), KINDS[0]: ("manpages", man[half:]), KINDS[1]: ("python", py),
            KINDS[2]: ("manpages", [codecs.encode(t, "rot13") for t in man[half:]]),
            KINDS[3]: ("manpages", random_text), KINDS[4]: ("manpages", spam)}


def split(texts: list[str], domain: str, windows, tokenizer) -> np.ndarray:
    """Held-out documents into ``windows``; the rest's tokens cut into training windows of SEQ."""
    from everlearn.daemon.holdout import document_key

    train = []
    for text in texts:
        tokens = tokenizer.encode(text)
        if windows.is_held_out(text):
            windows.add(tokens, domain, document_key(text))
        else:
            train.append(tokens)
    flat = np.concatenate(train).astype(np.int32)
    return flat[: len(flat) // SEQ * SEQ].reshape(-1, SEQ)


def one_seed(seed: int, args) -> dict[str, Any]:
    import safetensors.torch
    import torch

    from everlearn.daemon.holdout import HoldoutConfig, HoldoutWindows
    from everlearn.deploy import GateConfig
    from everlearn.deploy.evaluator import Evaluator
    from everlearn.learners import (
        CheckpointStore,
        Learner,
        ModelConfig,
        ScheduleConfig,
        TrainConfig,
        build_tokenizer,
    )
    from everlearn.learners.learner import WEIGHTS

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, max_position_embeddings=128)
    tokenizer = build_tokenizer(model)
    schedule = ScheduleConfig(warmup_steps=5, cooldown_steps=20, peak_lr=3e-3, constant_lr=3e-3, min_lr=1e-4)
    store = CheckpointStore(f"memory://gates-{uuid4().hex}")
    learner = Learner(model, TrainConfig(seq_len=SEQ, batch_size=BATCH, torch_threads=args.threads), schedule, store.url)
    cfg = GateConfig(min_fresh_tokens=500, probe_sequences=32, seed=seed)
    data = streams(rng, args.quick)

    windows = HoldoutWindows(HoldoutConfig(fraction=0.3, fresh_capacity=32), SEQ, probes=cfg.probe_sequences)
    base_train = split(data["serving"][1], "manpages", windows, tokenizer)
    v0 = store.commit(0, learner.save(0))
    for _ in range(args.serving_steps):
        learner.train_step(base_train[rng.integers(0, len(base_train), BATCH)])
    serving = store.commit(learner.step, learner.save(learner.step))
    state = copy.deepcopy((learner.model.state_dict(), learner.optimizer.state_dict(), learner.step))
    evaluator = Evaluator(model, batch_size=16)
    anchor = {"version": 0, **v0.to_dict()}
    out: dict[str, Any] = {}
    good_ref = good_windows = None
    for i, kind in enumerate(KINDS):
        w = copy.deepcopy(windows)
        if kind == KINDS[5]:  # the first good candidate with one NaN
            tensors = safetensors.torch.load(store.read(good_ref, WEIGHTS))
            name = next(iter(sorted(tensors)))
            tensors[name].view(-1)[0] = float("nan")
            ref = store.commit(10_000 + i, {WEIGHTS: store.put(10_000 + i, WEIGHTS, safetensors.torch.save(tensors))})
            evidence_windows = good_windows
        else:
            domain, texts = data[kind]
            stream = split(texts, domain, w, tokenizer)
            learner.model.load_state_dict(state[0])
            learner.optimizer.load_state_dict(state[1])
            learner.step = state[2]
            for _ in range(args.candidate_steps):
                fresh = stream[rng.integers(0, len(stream), BATCH - REPLAY)]
                replay = base_train[rng.integers(0, len(base_train), REPLAY)]
                learner.train_step(np.concatenate([fresh, replay]))
            learner.step += 1_000 * (i + 1)  # a checkpoint name of its own (the schedule is past its warm-up either way)
            ref = store.commit(learner.step, learner.save(learner.step))
            evidence_windows = w
            if i == 0:
                good_ref, good_windows = ref, w
        t0 = time.perf_counter()
        result = evaluator.judge(cfg, ref, serving, evidence_windows.evidence(cfg.max_eval_sequences), anchor)
        gates = {g["name"]: g["passed"] for g in result.metrics.get("gates", [])}
        out[kind] = {"promoted": result.passed, "reason": result.reason, "gates": gates, "judge_seconds": time.perf_counter() - t0,
                     "improvement": (result.metrics.get("improvement") or {}).get("lower"),
                     "kl": (result.metrics.get("behaviour") or {}).get("kl")}
        print(f"seed {seed} {kind:28s} {'PROMOTED' if result.passed else 'refused '} {result.reason[:110]}", flush=True)
    return out


def render(res: dict[str, Any]) -> str:
    seeds = res["seeds"]
    lines = [f"Verdicts over {len(seeds)} seeds: the share of candidates promoted, and how often each gate refused "
             "(a gate that refuses does not stop the later ones from being evaluated and recorded).", "",
             "| candidate | promoted | " + " | ".join(f"{g} refused" for g in GATES) + " | target |",
             "|:---|---:|" + "---:|" * len(GATES) + ":---|"]
    for kind in KINDS:
        runs = [s[kind] for s in seeds]
        promoted = sum(r["promoted"] for r in runs)
        refused = [sum(1 for r in runs if r["gates"].get(g) is False) for g in GATES]
        target = "promoted" if kind.startswith("good") else "refused, every seed"
        met = (promoted == len(runs)) if kind.startswith("good") else promoted == 0
        lines.append(f"| {kind} | {promoted}/{len(runs)} | " + " | ".join(f"{n}/{len(runs)}" for n in refused)
                     + f" | {target}: {'met' if met else 'MISSED'} |")
    lines += ["", "Reasons (first failing gate, or the pass), per seed:", ""]
    for kind in KINDS:
        for i, s in enumerate(seeds):
            lines.append(f"- {kind}, seed {res['seed_values'][i]}: {s[kind]['reason'][:220]}")
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> str:
    plt = pyplot()
    if plt is None:
        return NO_PLOT
    seeds = res["seeds"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / (len(GATES) + 1)
    x = np.arange(len(KINDS))
    promoted = [np.mean([s[k]["promoted"] for s in seeds]) for k in KINDS]
    ax.bar(x - 0.4 + width / 2, promoted, width, label="promoted", color="black")
    for j, g in enumerate(GATES):
        rates = [np.mean([s[k]["gates"].get(g) is False for s in seeds]) for k in KINDS]
        ax.bar(x - 0.4 + width * (j + 1.5), rates, width, label=f"{g} refused")
    ax.set_xticks(x, [k.replace(": ", ":\n") for k in KINDS], fontsize=8)
    ax.set_ylabel(f"share of {len(seeds)} seeds")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=4, loc="upper left")
    ax.set_title("Gate verdicts: good candidates should be promoted, poisoned ones refused")
    return save_figure(plt, fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5, help="seeds (each trains serving and six candidates)")
    p.add_argument("--serving-steps", type=int, default=200)
    p.add_argument("--candidate-steps", type=int, default=40)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 seed, a few steps, less text")
    p.add_argument("--out", type=Path, default=None, help="write gate_quality.md/.json/.png here (e.g. docs/bench)")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.serving_steps, args.candidate_steps = 1, 20, 5
    import torch

    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    seed_values = list(range(1, args.seeds + 1))
    res: dict[str, Any] = {"command": command_line(), "quick": args.quick, "seed_values": seed_values,
                           "machine": machine_info(torch=torch.__version__),
                           "setting": {"serving_steps": args.serving_steps, "candidate_steps": args.candidate_steps}}
    res["seeds"] = [one_seed(s, args) for s in seed_values]
    report(res, args.out, "gate_quality", title="Gate quality: good candidates promoted, poisoned ones refused",
           intro="", versions={"torch": "torch"},
           setting=f"Serving trained {args.serving_steps} steps, each candidate {args.candidate_steps} more. ",
           render=render, plot=plot, image_alt="share of seeds promoted and refused by each gate, per candidate kind",
           raw_note=" (every verdict)", t_start=t0)
    return res


if __name__ == "__main__":
    main()
