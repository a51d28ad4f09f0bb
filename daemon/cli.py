"""``everlearn``: run | status | validate | rollback | promote | pause | resume | gates explain | export."""

import argparse
import json
import sys
import urllib.error
import urllib.request

from everlearn.errors import EverlearnError

EPILOG = "Configuration: YAML (-c), then EVERLEARN_SECTION__FIELD environment variables, then --set section.field=value."


def _config(args):
    from everlearn.daemon.config import load_config

    return load_config(args.config, overrides=args.set)


def cmd_validate(args) -> int:
    cfg = _config(args)
    print(f"{args.config or '(embedded default)'}: valid")
    if args.show:
        import yaml

        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return 0


def cmd_run(args) -> int:
    cfg = _config(args)
    from everlearn.daemon.service import Daemon

    daemon = Daemon(cfg)
    final = daemon.run(max_steps=args.max_steps)
    daemon.progress.event("stopped", step=final["step"], served_version=final["served_version"],
                          checkpoint=final["last_checkpoint"])
    return 0


def _daemon_url(args, cfg=None) -> str:
    if args.url:
        return args.url.rstrip("/")
    cfg = cfg or _config(args)
    host = "127.0.0.1" if cfg.metrics.host in ("0.0.0.0", "") else cfg.metrics.host
    return f"http://{host}:{cfg.metrics.port}"


def cmd_status(args) -> int:
    url = _daemon_url(args)
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/status", timeout=5) as r:
            status = json.loads(r.read())
    except OSError as e:
        print(f"no everlearn daemon answers at {url} ({e}); is it running? (`everlearn run`, or pass --url)", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        from everlearn.daemon.progress import status_line

        print(status_line(status))
        if status.get("learner"):
            lr = status["learner"]
            lora = f", LoRA r={lr['lora_r']}" if lr.get("lora_r") else ""
            print(f"  learner: {lr['model']} ({lr.get('model_type')}), {lr['trainable']:,} of {lr['parameters']:,} parameters trained{lora}, "
                  f"{lr['device']} {lr['precision']}, {lr['workers']} worker(s)")
        for key in ("documents", "held_out", "dead_lettered", "tokens_trained", "pending_tokens", "last_checkpoint", "serving_url"):
            print(f"  {key}: {status.get(key)}")
        if status.get("last_gate"):
            print(f"  last gate: {status['last_gate'].get('reason')}")
        if status.get("paused"):
            print(f"  paused: {status['paused'].get('reason')} (`everlearn resume` trains again)")
        if status.get("watch"):
            w = status["watch"]
            print(f"  watching version {w.get('version')} after its swap (rolls back to {w.get('previous')} on a regression)")
        branch = (status.get("branch") or {}).get("running")
        if branch:
            print(f"  anneal branch from step {branch['from_step']} ({branch['anneal_steps']} steps): running {branch.get('running_s')} s"
                  f"{', waiting for the judge' if branch.get('waiting_for_judge') else ''}")
        drift = status.get("drift") or {}
        if drift.get("psi") is not None:
            print(f"  drift: PSI {drift['psi']:.3f}, JS {drift['js']:.3f} bits{' (drifting)' if drift.get('data_drift') else ''}")
    return 0


def _admin(args, action: str, body: dict) -> int:
    """POST one admin action to the daemon with its bearer token; prints the answer."""
    from everlearn.daemon.admin import TOKEN_ENV, resolve_token

    cfg = _config(args)
    url = _daemon_url(args, cfg)
    if args.token_file:
        cfg.admin.token_file = args.token_file
    token = resolve_token(cfg.admin, cfg.run_dir)
    if token is None:
        print(f"no admin token: set {TOKEN_ENV}, pass --token-file, or run this where <run_dir>/admin.token is "
              f"({cfg.run_dir}/admin.token is absent)", file=sys.stderr)
        return 2
    req = urllib.request.Request(f"{url}/admin/{action}", data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=cfg.admin.action_timeout_s + 10) as r:
            answer, code = json.loads(r.read()), r.status
    except urllib.error.HTTPError as e:
        answer, code = json.loads(e.read() or b"{}"), e.code
    except OSError as e:
        print(f"no everlearn daemon answers at {url} ({e}); is it running? (`everlearn run`, or pass --url)", file=sys.stderr)
        return 1
    if code != 200:
        print(f"everlearn {action}: refused ({code}): {answer.get('error', answer)}", file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2, default=str))
    return 0


def cmd_rollback(args) -> int:
    return _admin(args, "rollback", {"version": args.version, **({"reason": args.reason} if args.reason else {})})


def cmd_promote(args) -> int:
    return _admin(args, "promote", {"step": args.step, **({"reason": args.reason} if args.reason else {})})


def cmd_pause(args) -> int:
    return _admin(args, "pause", {"reason": args.reason} if args.reason else {})


def cmd_resume(args) -> int:
    return _admin(args, "resume", {})


def cmd_gates_explain(args) -> int:
    """Print the audit records of one version (its promotion, and any revert or rollback of it) or one step's judgement."""
    from pathlib import Path

    from everlearn.deploy.audit import AuditLog
    from everlearn.deploy.explain import explain

    cfg = _config(args)
    path = Path(args.audit or Path(cfg.run_dir) / "audit.jsonl")
    if not path.exists():
        print(f"no audit log at {path}; pass the run's config (-c) or --audit PATH", file=sys.stderr)
        return 1
    records = AuditLog(path).read()
    if args.step is not None:
        chosen = [r for r in records if r.get("step") == args.step and "metrics" in r]
        what = f"step {args.step}"
    else:
        keys = ("promoted_version", "reverted_version", "rolled_back_from", "serving_version")
        chosen = [r for r in records if r.get("promoted_version") == args.version
                  or (r.get("verdict") in ("reverted", "rolled_back") and args.version in (r.get(k) for k in keys))]
        what = f"version {args.version}"
    if not chosen:
        versions = sorted({r["promoted_version"] for r in records if isinstance(r.get("promoted_version"), int)})
        print(f"the audit log {path} has no decision about {what}; promoted versions: {versions[-30:]}"
              " (a rejected candidate is found by --step)", file=sys.stderr)
        return 1
    for record in chosen:
        print(json.dumps(record, indent=2, default=str) if args.json else explain(record))
        print()
    return 0


def cmd_export(args) -> int:
    from pathlib import Path

    from everlearn.daemon.export import export

    written = export(_config(args), args.step, Path(args.dir), merged=args.merged, force=args.force)
    print(json.dumps(written, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="everlearn", description="A streaming continual-learning daemon.", epilog=EPILOG)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("-c", "--config", help="YAML config file (default: the embedded default, examples/local.yaml)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one field, e.g. --set serve.port=8001 (repeatable)")

    r = sub.add_parser("run", help="run the daemon until SIGINT/SIGTERM (checkpoints, then exits 0) or --max-steps", epilog=EPILOG)
    common(r)
    r.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps in this invocation")
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("status", help="print the state of a running daemon", epilog=EPILOG)
    common(s)
    s.add_argument("--url", help="the daemon's status URL (default: from the config's metrics host and port)")
    s.add_argument("--json", action="store_true", help="print the raw JSON")
    s.set_defaults(func=cmd_status)

    v = sub.add_parser("validate", help="check a config file and report every problem", epilog=EPILOG)
    common(v)
    v.add_argument("--show", action="store_true", help="print the resolved configuration")
    v.set_defaults(func=cmd_validate)

    def admin(name: str, help: str):
        sp = sub.add_parser(name, help=help, epilog="Needs the admin token: EVERLEARN_ADMIN_TOKEN, --token-file, admin.token_file "
                                                      "or <run_dir>/admin.token (written by the daemon at start).")
        common(sp)
        sp.add_argument("--url", help="the daemon's URL (default: from the config's metrics host and port)")
        sp.add_argument("--token-file", help="file holding the admin token")
        sp.add_argument("--reason", help="why (recorded in the audit log and events)")
        return sp

    rb = admin("rollback", "serve an earlier promoted version again (its exact weights)")
    rb.add_argument("version", nargs="?", type=int, default=None, help="the version to serve (default: the one before the served one)")
    rb.set_defaults(func=cmd_rollback)
    pr = admin("promote", "serve the committed checkpoint of STEP now, without the gates (audited as manual)")
    pr.add_argument("step", type=int, help="the step of a committed checkpoint")
    pr.set_defaults(func=cmd_promote)
    admin("pause", "pause training (serving keeps answering; survives restarts until resume)").set_defaults(func=cmd_pause)
    admin("resume", "resume training after a pause").set_defaults(func=cmd_resume)

    g = sub.add_parser("gates", help="what the gates decided")
    gsub = g.add_subparsers(dest="gates_command", required=True)
    ex = gsub.add_parser("explain", help="print the audit record(s) of VERSION (or --step) with every number the gates used")
    common(ex)
    ex.add_argument("version", nargs="?", type=int, help="a promoted version number")
    ex.add_argument("--step", type=int, help="the candidate step instead (rejected candidates have no version)")
    ex.add_argument("--audit", help="the audit log (default: <run_dir>/audit.jsonl)")
    ex.add_argument("--json", action="store_true", help="print the raw records")
    ex.set_defaults(func=cmd_gates_explain)

    xp = sub.add_parser("export", help="write a checkpoint's model as a save_pretrained directory (LoRA: the adapter, or --merged)",
                        epilog=EPILOG)
    common(xp)
    xp.add_argument("step", metavar="STEP", help="a committed step, latest, or served")
    xp.add_argument("dir", metavar="DIR", help="the directory to write (new or empty)")
    xp.add_argument("--merged", action="store_true", help="LoRA: merge the adapter into the base and write a plain model")
    xp.add_argument("--force", action="store_true", help="replace DIR when it is not empty")
    xp.set_defaults(func=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "gates" and args.version is None and args.step is None:
        parser.error("gates explain needs a VERSION or --step")
    try:
        return args.func(args)
    except EverlearnError as e:
        cause = getattr(e, "cause", None)  # raised in a Ray actor: the error itself, without the actor's traceback
        print(f"everlearn {args.command}: {cause if isinstance(cause, EverlearnError) else e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
