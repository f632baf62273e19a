"""`gradcomp` command line. Each verb's work lives in its own module, imported on use so
that `gradcomp --help` stays fast and a verb's dependencies load only when needed.

Verb handlers: train -> worker.launch, serve -> server.app, client -> client.grpc_client,
fedsim -> sim.run, sweep -> study.sweep, audit -> audit.run, bench -> benchmarks/<name>.py.
"""

from __future__ import annotations

import argparse
import importlib
import runpy
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from gradcomp import __version__
from gradcomp.errors import GradcompError

# Shown as one line, exit 2: what the user gave was wrong. Anything else is an internal error (traceback, exit 1).
USER_ERRORS: tuple[type[BaseException], ...] = (GradcompError, FileNotFoundError, PermissionError, IsADirectoryError)


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a job-file key, e.g. --set train.epochs=3 (repeatable)",
    )


def _add_audit(verbs: argparse._SubParsersAction) -> None:
    """`gradcomp audit`: gradient-inversion attacks on what each spec puts on the wire."""
    p = verbs.add_parser("audit", help="gradient-inversion attacks on compression specs' payloads")
    p.add_argument("--spec", action="append", required=True, help="compression spec to audit (repeatable)")
    p.add_argument("--task", default="digits-mlp", help="task whose model and test images are attacked")
    p.add_argument(
        "--task-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an argument of the task (repeatable; YAML value), e.g. size=tiny or data_dir=~/cifar",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        action="append",
        default=None,
        help="victims per gradient (repeatable; default 1 and 4)",
    )
    p.add_argument("--victims", type=int, default=8, help="test images attacked per batch size")
    p.add_argument("--iterations", type=int, default=200, help="optimisation steps of the cosine and L2 attacks")
    p.add_argument("--seed", type=int, default=0, help="model initialisation, victim choice and attack starts")
    p.add_argument(
        "--setting",
        action="append",
        choices=("init", "trained", "federated", "secagg"),
        default=None,
        help="setting to attack in (repeatable; default init, trained, federated: the verdict takes the worst; "
        "secagg: the coordinator's view of a client's masked input under secure aggregation)",
    )
    p.add_argument("--trained-epochs", type=int, default=3, help="'trained': epochs of training before the attack")
    p.add_argument("--local-epochs", type=int, default=5, help="'federated': the client's local epochs per round")
    p.add_argument("--out", default="runs/audit/audit.json", help="JSON file; the PNG grid goes beside it")
    p.set_defaults(handler="gradcomp.audit.run:run_audit")


def _add_run_options(p: argparse.ArgumentParser, ray_help: str | None, check_help: str) -> None:
    """Options every job verb shares: --set, the Ray address (for verbs that use Ray), --runs-dir, --check."""
    _add_overrides(p)
    if ray_help is not None:
        p.add_argument("--address", default=None, help=ray_help)
    p.add_argument("--runs-dir", default="runs", help="where runs/<name>/ is written")
    p.add_argument("--check", action="store_true", help=check_help)


def _add_train(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("train", help="data-parallel training on Ray with compressed all-reduce")
    p.add_argument("job", help="job file (YAML), e.g. examples/digits-rtopk.yaml")
    _add_run_options(
        p, "Ray cluster address (default: $RAY_ADDRESS, else start a local Ray)", "validate the job file and exit"
    )
    p.add_argument("--workers", type=int, default=None, help="override scaling.num_workers")
    p.add_argument("--fresh", action="store_true", help="discard runs/<name>/ (checkpoints, results) and start over")
    p.add_argument("--metrics-port", type=int, default=None, help="serve training metrics at :PORT/metrics (0: any)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="bind address of /metrics (default 127.0.0.1)")
    p.add_argument(
        "--metrics-linger", type=float, default=0.0, metavar="SECONDS", help="keep /metrics up this long after the run"
    )
    p.set_defaults(handler="gradcomp.worker.launch:run_train")


def _add_serve(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("serve", help="federated-averaging coordinator (gRPC)")
    p.add_argument("--config", required=True, help="federated job file (YAML)")
    _add_run_options(p, None, "validate the job file and exit")
    p.add_argument(
        "--host",
        default=None,
        help="bind address (default 127.0.0.1 without TLS, 0.0.0.0 with it; beyond loopback without TLS: --insecure)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="serve without TLS on an address other than loopback (sets server.insecure_plaintext): clear text",
    )
    p.add_argument("--port", type=int, default=None, help="gRPC port (default from the job file)")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics port")
    p.add_argument("--resume", action="store_true", help="continue from the run directory")
    p.set_defaults(handler="gradcomp.server.app:run_serve")


def _add_client(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("client", help="a federated participant")
    p.add_argument("--server", required=True, help="coordinator HOST:PORT")
    p.add_argument("--token-file", default=None, metavar="PATH", help="file holding the bearer token (keep it 0600)")
    p.add_argument(
        "--token", default=None, help="bearer token; visible to local users in the process list: prefer --token-file "
        "or $GRADCOMP_TOKEN (the default source)",
    )  # fmt: skip
    p.set_defaults(token_from_cli=True)  # a --token value came from the command line (see client/credentials.py)
    p.add_argument("--client-id", default=None, help="stable client name (default: hostname-pid)")
    p.add_argument("--shard", default=None, help="which data shard, I/N (e.g. 0/3)")
    p.add_argument("--tls-ca", default=None, help="CA certificate to verify the coordinator")
    p.add_argument("--tls-cert", default=None, help="client certificate (mutual TLS)")
    p.add_argument("--tls-key", default=None, help="client key (mutual TLS)")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="connect without TLS to an address other than loopback (tokens and updates in clear text)",
    )
    p.add_argument("--seed", type=int, default=0, help="added to the job seed for this client's randomness")
    _add_client_timing(p)
    p.add_argument("--retry-seconds", type=float, default=60.0, help="retry transient errors this long")
    p.add_argument("--rpc-timeout", type=float, default=30.0, help="deadline of each RPC in seconds")
    p.add_argument("--quiet", action="store_true", help="no per-round log lines")
    p.add_argument(
        "--allow-task",
        action="append",
        default=[],
        metavar="MODULE:FUNCTION",
        help="an entry point the coordinator may name as the task (repeatable; built-ins always run)",
    )
    p.add_argument(
        "--require-dp", action="store_true", help="refuse a task whose spec has no dp stage adding noise (sigma > 0)"
    )
    p.add_argument("--min-noise-multiplier", type=float, default=None, help="refuse dp with a lower sigma")
    p.add_argument("--max-clip", type=float, default=None, help="refuse dp with a larger clip")
    p.add_argument(
        "--noise-key-file",
        default=None,
        metavar="PATH",
        help="this client's secret local-DP noise key, created 0600 on first use; keep it to resend a redone "
        "round unchanged (default: $XDG_STATE_HOME/gradcomp/client-noise.key, ~/.local/state when unset)",
    )
    p.add_argument(
        "--max-epsilon",
        type=float,
        default=None,
        help="refuse a release that would take this client's own epsilon (Gaussian at q = 1 over every release it "
        "recorded next to its key file, across jobs) past this",
    )
    p.add_argument("--delta", type=float, default=1e-5, help="delta of the client's own epsilon (default 1e-5)")
    _add_work_limits(p)
    p.set_defaults(handler="gradcomp.client.grpc_client:run_client")


def _add_work_limits(p: argparse.ArgumentParser) -> None:
    """The work a coordinator may ask of a client per round (fedclient/limits.py; defaults in docs/security.md)."""
    g = p.add_argument_group("work limits", "refuse a task that asks more than this (defaults fit the built-in tasks)")
    for flag, kind, what in (
        ("--max-epochs", int, "local epochs per round (default 20)"),
        ("--max-batch-size", int, "batch size (default 4096)"),
        ("--max-steps", int, "local steps per round: epochs x batches, or the fixed-work steps (default 20000)"),
        ("--max-task-arg", int, "largest number among the task's arguments (default 100000)"),
        ("--max-model-params", int, "parameters of the task's model (default 30000000)"),
        ("--max-round-seconds", float, "wall time of one round's local training (default 900)"),
        ("--max-memory-mib", int, "address space the client may grow by, in MiB; 0: no ceiling (default 8192)"),
    ):
        g.add_argument(flag, type=kind, default=None, help=what)


def _add_client_timing(p: argparse.ArgumentParser) -> None:
    """What keeps a client's round times from telling the coordinator its shard size (docs/privacy.md)."""
    p.add_argument(
        "--local-steps",
        type=int,
        default=0,
        metavar="N",
        help="fixed-work mode: N batches of the job's batch size, drawn with replacement, every round whatever "
        "the shard's size, so round times do not reveal it (default 0: the job's local.steps)",
    )
    p.add_argument(
        "--pad-round-seconds",
        type=float,
        default=0.0,
        metavar="S",
        help="submit each update no earlier than S seconds after its task arrived, so round times show the "
        "padding rather than the data (default 0: no padding)",
    )


def _add_fedsim(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("fedsim", help="simulate many federated clients on Ray")
    p.add_argument("job", help="federated job file (YAML)")
    _add_run_options(p, "Ray cluster address (default: local Ray)", "validate the job file and exit")
    p.add_argument("--grpc", action="store_true", help="send updates over real gRPC on 127.0.0.1")
    p.add_argument("--metrics-port", type=int, default=None, help="serve the coordinator's metrics at :PORT/metrics")
    p.set_defaults(handler="gradcomp.sim.run:run_fedsim")


def _add_sweep(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("sweep", help="run a grid of jobs; write a table, report and plots")
    p.add_argument("sweep", help="sweep file (YAML)")
    _add_run_options(p, "Ray cluster address (default: local Ray)", "validate the sweep file and exit")
    p.set_defaults(handler="gradcomp.study.sweep:run_sweep")


def _add_bench(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("bench", help="run a benchmark from benchmarks/ (prints JSON + table)")
    p.add_argument("name", help="benchmark name, e.g. compress, train_digits, bandwidth")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    p.set_defaults(handler=run_bench)


VERBS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_train,
    _add_serve,
    _add_client,
    _add_fedsim,
    _add_sweep,
    _add_audit,
    _add_bench,
)


def build_parser() -> argparse.ArgumentParser:
    """The `gradcomp` parser: one sub-command per verb, each naming its handler as 'module:function'."""
    parser = argparse.ArgumentParser(
        prog="gradcomp",
        description="Distributed and federated training with gradient compression and privacy.",
    )
    parser.add_argument("--version", action="version", version=f"gradcomp {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add_verb in VERBS:
        add_verb(verbs)
    return parser


def run_bench(args: argparse.Namespace) -> int:
    """Run benchmarks/<name>.py from the source tree (benchmarks are not installed)."""
    root = Path(__file__).resolve().parents[2]
    script = root / "benchmarks" / f"{args.name}.py"
    if not script.is_file():
        known = sorted(p.stem for p in (root / "benchmarks").glob("*.py") if not p.stem.startswith("_"))
        raise FileNotFoundError(f"no benchmark {args.name!r}; available: {', '.join(known) or 'none'}")
    sys.argv = [str(script), *args.args]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def _resolve(handler: str | Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    if callable(handler):
        return handler
    module, func = handler.split(":")
    return getattr(importlib.import_module(module), func)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(_resolve(args.handler)(args) or 0)
    except USER_ERRORS as err:
        print(f"gradcomp {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gradcomp {args.verb}: interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print(f"gradcomp {args.verb}: internal error (the traceback above); please report it", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
