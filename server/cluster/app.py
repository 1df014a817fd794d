"""`loraswap serve --ray`: the Ray Serve application (proxy, replicas, directory) and its run until SIGINT/SIGTERM.

Without `--ray-address`, a local Ray cluster is started on the loopback address (Ray's token auth on, as Ray sets it
by default) and stopped at the end, with every process it started; with one, the application joins that cluster and
only the application is removed at the end. Ray Serve's HTTP proxy listens on the server's host and port.

Settings reach the replicas as the application's arguments; the keys (`LORASWAP_API_KEY`, `LORASWAP_ADMIN_KEY`) and
the registry's credentials never do: each Ray node's environment provides them (a local cluster inherits this
process's).
"""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any

from loraswap.server.cluster.replica import SECRETS
from loraswap.server.settings import Settings

APP = "loraswap"
"""The Ray Serve application's name."""
INSTALL = "pip install 'loraswap[ray]'"


class ClusterError(ValueError):
    """Options or a cluster that cannot run the application; the message says what to change."""


@dataclass(frozen=True)
class RayOptions:
    """How the application runs on Ray."""

    replicas: int = 1
    """Replicas (each a whole server: the base, the engine, adapters); with autoscaling, the initial count."""
    address: str | None = None
    """An existing Ray cluster (`ray://host:10001` or `host:6379`); unset: a local cluster started and stopped here."""
    min_replicas: int | None = None
    """Autoscaling (with max_replicas): the fewest replicas."""
    max_replicas: int | None = None
    """Autoscaling: the most replicas."""
    target_ongoing_requests: float | None = None
    """Autoscaling: the requests per replica Serve aims at (Serve's default, 2, where unset)."""
    replica_cpus: float = 1.0
    """CPUs Ray reserves per replica (fractions allowed)."""

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ClusterError(f"--replicas must be at least 1 (got {self.replicas})")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ClusterError("autoscaling needs both --min-replicas and --max-replicas")
        if self.min_replicas is not None and self.max_replicas is not None:
            if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
                raise ClusterError(
                    f"need 0 <= --min-replicas <= --max-replicas and --max-replicas >= 1 "
                    f"(got {self.min_replicas} and {self.max_replicas})"
                )
            if not self.min_replicas <= self.replicas <= self.max_replicas:
                raise ClusterError(
                    f"--replicas {self.replicas} (the initial count) must lie within "
                    f"--min-replicas {self.min_replicas} and --max-replicas {self.max_replicas}"
                )
        elif self.target_ongoing_requests is not None:
            raise ClusterError(
                "--target-ongoing-requests applies to autoscaling: give --min-replicas and --max-replicas"
            )
        if self.target_ongoing_requests is not None and self.target_ongoing_requests <= 0:
            raise ClusterError(f"--target-ongoing-requests must be positive (got {self.target_ongoing_requests})")
        if self.replica_cpus <= 0:
            raise ClusterError(f"--replica-cpus must be positive (got {self.replica_cpus})")


def application(settings: Settings, options: RayOptions) -> Any:
    """The bound application: the proxy (ingress) over the replicas, and the directory of their metrics."""
    from ray import serve

    from loraswap.server.cluster.directory import Directory
    from loraswap.server.cluster.proxy import Proxy
    from loraswap.server.cluster.replica import Replica

    values = settings.model_dump(mode="json", exclude=set(SECRETS))
    quiet = {"enable_access_log": False, "log_level": "WARNING"}
    directory = serve.deployment(
        name="Directory", num_replicas=1, ray_actor_options={"num_cpus": 0}, logging_config=quiet
    )(Directory).bind()
    scaling: dict[str, Any] = {"num_replicas": options.replicas}
    if options.min_replicas is not None:
        auto: dict[str, Any] = {
            "min_replicas": options.min_replicas,
            "max_replicas": options.max_replicas,
            "initial_replicas": options.replicas,
        }
        if options.target_ongoing_requests is not None:
            auto["target_ongoing_requests"] = options.target_ongoing_requests
        scaling = {"autoscaling_config": auto}
    replicas = serve.deployment(
        name="Replica",
        ray_actor_options={"num_cpus": options.replica_cpus},
        # A running batch and the next one waiting; past that Serve queues the request (or sends it elsewhere).
        max_ongoing_requests=2 * settings.max_batch_size * settings.workers,
        graceful_shutdown_timeout_s=settings.drain_seconds,
        health_check_period_s=5,
        health_check_timeout_s=30,
        logging_config=quiet,
        **scaling,
    )(Replica).bind(values, directory)
    return serve.deployment(
        name="Proxy",
        num_replicas=1,
        max_ongoing_requests=4096,
        ray_actor_options={"num_cpus": 0},
        logging_config=quiet,
    )(Proxy).bind(replicas, directory, values)


def build(args: dict[str, Any]) -> Any:
    """The application for a Serve config file (`import_path: loraswap.server.cluster.app:build`, as KubeRay's
    RayService `serveConfigV2` names it): `args` holds `settings` (Settings fields, LORASWAP_* of the nodes beneath
    them) and `ray` (RayOptions fields but `address`)."""
    settings = Settings.from_env(**dict(args.get("settings") or {}))
    return application(settings, RayOptions(**dict(args.get("ray") or {})))


def run(settings: Settings, options: RayOptions) -> int:
    """Deploy, serve until SIGINT or SIGTERM, then remove the application (replicas drain for up to
    drain_seconds) and stop the local cluster if this started it. Returns the exit status."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ClusterError(f"--ray needs Ray Serve, an optional extra: {INSTALL}") from None

    stop = threading.Event()
    local = options.address is None
    if local:
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    else:
        ray.init(address=options.address, log_to_driver=False)
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own SIGTERM handler
        signal.signal(sig, lambda *_: stop.set())
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        if len(nodes) > 1 and not settings.registry:
            raise ClusterError(
                f"the cluster has {len(nodes)} nodes: replicas on several nodes need a shared adapter registry "
                "(--registry s3://BUCKET/PREFIX); a local folder store serves a single node"
            )
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(application(settings, options), name=APP, route_prefix="/")
        scale = (
            f"{options.replicas} replicas"
            if options.min_replicas is None
            else f"{options.min_replicas}-{options.max_replicas} replicas (autoscaling, {options.replicas} at first)"
        )
        print(
            f"loraswap: serving on http://{settings.host}:{settings.port} with {scale} on Ray "
            f"({'a local cluster' if local else options.address}, {len(nodes)} node(s))",
            file=sys.stderr,
            flush=True,
        )
        stop.wait()
        print("loraswap: stopping: replicas drain their running requests", file=sys.stderr, flush=True)
        serve.delete(APP)
    finally:
        if local:
            serve.shutdown()
        ray.shutdown()
    return 0
