"""``everlearn``: run | status | validate."""

import argparse
import json
import sys
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


def cmd_status(args) -> int:
    if args.url:
        url = args.url
    else:
        cfg = _config(args)
        host = "127.0.0.1" if cfg.metrics.host in ("0.0.0.0", "") else cfg.metrics.host
        url = f"http://{host}:{cfg.metrics.port}"
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
        for key in ("documents", "held_out", "dead_lettered", "tokens_trained", "pending_tokens", "last_checkpoint", "serving_url"):
            print(f"  {key}: {status.get(key)}")
        if status.get("last_gate"):
            print(f"  last gate: {status['last_gate'].get('reason')}")
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EverlearnError as e:
        print(f"everlearn {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
