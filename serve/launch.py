"""Starting the graph: a local Ray on loopback (or a running cluster), Serve on host:port, then
waiting for ``/health/ready`` while showing each deployment's progress; ``ragraph serve`` refuses to
start beside orphaned vLLM engines of an earlier run and exits when its local Ray goes away. Also
the Serve config export."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from serve.graph import APP_NAME


class LaunchError(RuntimeError):
    pass


class RayGoneError(LaunchError):
    """The local Ray under a running ``ragraph serve`` went away (``ray stop``, a kill, the OOM killer)."""


RAY_DAEMONS = ("gcs_server", "raylet")  # the local Ray's processes that ``ragraph serve`` watches
WATCH_S = 1.0  # ... this often


def local_ray_daemons() -> list:
    """The GCS and raylet that this process's ``ray.init`` started (its children)."""
    import psutil

    return [p for p in psutil.Process().children() if p.name() in RAY_DAEMONS]


def wait_while_ray_lives(daemons: list, *, poll_s: float = WATCH_S) -> None:
    """Return never; raise :class:`RayGoneError` once one of ``daemons`` has exited."""
    import psutil

    def gone(p) -> bool:
        try:
            return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    while True:
        dead = [p for p in daemons if gone(p)]
        if dead:
            which = ", ".join(f"{p.name()} (pid {p.pid})" for p in dead)
            raise RayGoneError(
                f"the local Ray stopped under ragraph serve: {which} exited (`ray stop`, a kill or the OOM "
                "killer); the service is down and its engines stop with it. Start it again with `ragraph serve`"
            )
        time.sleep(poll_s)


def ready_status(url: str, timeout: float = 5) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"{url}/health/ready", timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"{}")
        except ValueError:
            return e.code, {}
    except (urllib.error.URLError, OSError, ValueError):
        return 0, {}


def runtime_env(cfg) -> dict[str, Any]:
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if cfg.models.generator.source == "hub" or cfg.models.embedder.source == "hub":
        env = {"TOKENIZERS_PARALLELISM": "false"}
    return {"env_vars": env}


# How often each Ray worker reports its application metrics to the node's agent: the staleness of
# other ingress replicas' series in GET /metrics (flow/metrics.py). Ray's default is 10 s.
METRICS_REPORT_MS = 2000
FAST_PATHS = "RAY_SERVE_THROUGHPUT_OPTIMIZED"


def start_ray(cfg, *, address: str | None, verbose: bool = False) -> None:
    import ray

    # RAY_AUTH_MODE stays as the user set it. Unset, the local Ray started below gets Ray's token
    # authentication (Ray 2.60's default for ray.init(); the token in ~/.ray/auth_token), and it
    # listens on loopback only (init_ray). A cluster's token comes from RAY_AUTH_TOKEN or
    # RAY_AUTH_TOKEN_PATH.
    from common.local_ray import init_ray

    if ray.is_initialized():
        return
    if address:  # a cluster, joined as it is
        init_ray(address=address, runtime_env=runtime_env(cfg), log_to_driver=verbose)
        return
    cpus = cfg.http.ray_num_cpus or max(os.cpu_count() or 1, 8)
    # read by every Ray process this starts (controller, proxy, replicas); an explicit variable wins
    os.environ.setdefault(FAST_PATHS, "1" if cfg.http.throughput_optimized else "0")
    # ... but request logs written as they happen: the fast paths buffer 1,000 lines per replica, so
    # a quiet service would show an operator no request (and no request id) for hours
    os.environ.setdefault("RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE", "1")
    # on loopback: its GCS, raylet, object manager and workers listen on 127.0.0.1 only
    init_ray(num_cpus=cpus, include_dashboard=False, runtime_env=runtime_env(cfg), log_to_driver=verbose,
             _system_config={"metrics_report_interval_ms": METRICS_REPORT_MS})


def deploy(cfg, *, address: str | None = None, verbose: bool = False, progress=print) -> float:
    """Start Ray and Serve, deploy the graph, wait for /health/ready. Returns the cold start (s)."""
    from ray import serve

    from serve.graph import build_app

    t0 = time.perf_counter()
    start_ray(cfg, address=address, verbose=verbose)
    serve.start(proxy_location=cfg.http.proxy_location, http_options={"host": cfg.http.host, "port": cfg.http.port})
    app = build_app(cfg)  # in this thread: a failing import shows here, and logging set up by it is this thread's
    url = f"http://{'127.0.0.1' if cfg.http.host in ('0.0.0.0', '::') else cfg.http.host}:{cfg.http.port}"
    failure: list[BaseException] = []

    def run() -> None:
        try:
            serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        except BaseException as e:  # shown by the waiting loop
            failure.append(e)

    threading.Thread(target=run, daemon=True).start()
    last = ""
    while True:
        elapsed = time.perf_counter() - t0
        if failure:
            raise LaunchError(f"deploying the graph failed after {elapsed:.0f} s: {failure[0]}")
        code, body = ready_status(url, timeout=2)
        if code == 200:
            return time.perf_counter() - t0
        line = _progress_line(body)
        if line != last:
            progress(f"  [{elapsed:5.0f} s] {line}")
            last = line
        if elapsed > cfg.http.ready_timeout_s:
            raise LaunchError(
                f"not ready after {cfg.http.ready_timeout_s:.0f} s (http.ready_timeout_s): {line}; "
                "replica logs: /tmp/ray/session_latest/logs/serve/"
            )
        time.sleep(1)


def _progress_line(body: dict[str, Any]) -> str:
    try:
        from ray import serve

        app = serve.status().applications.get(APP_NAME)
        if app is not None and app.deployments:
            states = ", ".join(f"{n}: {str(getattr(d.status, 'value', d.status)).lower()}" for n, d in app.deployments.items())
            extra = body.get("checks", {}).get("index")
            return states + (f"; index: {extra}" if extra and extra != "ok" else "")
    except Exception:
        pass
    return "starting Serve"


def check_exposure(cfg, *, insecure: bool = False):
    """``ragraph serve``'s side of :func:`serve.graph.check_exposure`: ``insecure`` (``--insecure``)
    sets ``http.insecure_auth_off`` (so an exported Serve config carries the opt-in) and lets any
    Host header in (``http.allowed_hosts: ['*']`` unless set) when the service listens beyond
    loopback with auth off; admin endpoints still answer only loopback callers. Raises
    :class:`LaunchError` with what to do when the graph builder would refuse the config. Returns the
    config to serve."""
    from serve.graph import exposure_problem

    if insecure and exposure_problem(cfg):
        http = {"insecure_auth_off": True, **({} if cfg.http.allowed_hosts else {"allowed_hosts": ["*"]})}
        cfg = cfg.model_copy(update={"http": cfg.http.model_copy(update=http)})
    problem = exposure_problem(cfg)
    if problem:
        raise LaunchError(problem)
    return cfg


def auth_notice(cfg) -> str | None:
    """What `ragraph serve` says about access control at start-up (None: nothing to say)."""
    g = cfg.governor
    if not g.auth.enabled:
        exposed = cfg.http.host not in ("127.0.0.1", "localhost", "::1")
        return ("auth is OFF (governor.auth.enabled: false): anyone who can reach the port can use every endpoint"
                + (f", and the service listens on {cfg.http.host}" if exposed else "")
                + "; turn it on and create keys with `ragraph keys create NAME`")
    from state.db import describe, open_database, url_of
    from state.keys import SqlKeys

    if SqlKeys(open_database(cfg)).count_active() == 0:
        return (f"auth is on but the state database {describe(url_of(cfg))} holds no active key: every request "
                "will get 401; `ragraph keys create NAME`")
    return None


def quiet_console(log_file: Path) -> Path:
    """Send every library's log records and warnings to ``log_file`` instead of the terminal (Ray's
    and Serve's INFO lines, vLLM's and torch's start-up warnings, JSON log lines): the console keeps
    what `ragraph serve` itself prints. Call again after imports that add their own handlers."""
    import logging
    import warnings

    log_file = Path(log_file).expanduser()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = next((h for h in logging.root.handlers if isinstance(h, logging.FileHandler)
                    and Path(h.baseFilename) == log_file.resolve()), None)
    if handler is None:
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.root] + [lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    consoles = {id(x) for x in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)}
    for lg in loggers:
        for h in list(lg.handlers):  # only handlers that write to the terminal
            if isinstance(h, logging.StreamHandler) and id(getattr(h, "stream", None)) in consoles:
                lg.removeHandler(h)
        if lg is logging.root or not lg.propagate:
            if handler not in lg.handlers:
                lg.addHandler(handler)
    if logging.root.level > logging.INFO or logging.root.level == logging.NOTSET:
        logging.root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # vLLM would add its own console handler on import
    return log_file


def launch(cfg, *, address: str | None, verbose: bool, block: bool) -> int:
    from ray import serve

    if not address:  # a local Ray: refuse to start beside engines that an earlier run left holding memory
        from deployments.engine_guard import describe_orphans, orphaned_engines

        if orphans := orphaned_engines():
            raise LaunchError(f"refusing to start: {describe_orphans(orphans)}")
    url = f"http://{cfg.http.host}:{cfg.http.port}"
    print(f"ragraph serve: starting the graph on {'Ray at ' + address if address else 'a local Ray'}")
    log_file = None
    if not verbose:
        log_file = quiet_console(Path("~/.cache/ragraph/logs/serve-driver.log"))
        print(f"  library logs: {log_file} (--verbose shows them here)")
    if log_file is None:
        took = deploy(cfg, address=address, verbose=verbose)
    else:
        # importing the graph (ray.serve.llm, vLLM) resets the root logger to a JSON console handler and
        # logs at once; while it deploys, stderr is the log file, so those lines and handlers land there
        sink = open(log_file, "a", buffering=1)  # noqa: SIM115 - stays open: handlers made meanwhile write to it
        console, sys.stderr = sys.stderr, sink
        try:
            took = deploy(cfg, address=address, verbose=verbose)
        finally:
            sys.stderr = console
        quiet_console(log_file)
    print(f"ragraph is ready at {url} (cold start {took:.0f} s)")
    print(f"  OpenAI base URL: {url}/v1   model: {cfg.generator.served_model_name}")
    print("  try: ragraph chat \"how do I add GPU replicas?\"")
    notice = auth_notice(cfg)
    if notice:
        print(f"  note: {notice}")
    if not verbose:
        print("  replica logs (JSON): /tmp/ray/session_latest/logs/serve/")
    sys.stdout.flush()
    if address or not block:
        return 0
    import signal

    def stop(signum, _frame) -> None:  # SIGTERM (systemd, docker stop, kill) stops as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    daemons = local_ray_daemons()
    try:
        wait_while_ray_lives(daemons)  # raises RayGoneError when the local Ray goes away
    except KeyboardInterrupt:
        print("\nstopping ragraph (the generator's engine processes stop with it)")
        serve.shutdown()
    return 0


def export_serve_config(cfg) -> str:
    """A Serve config file for ``serve deploy``: the app builder plus the whole config tree as its
    args, so the cluster runs exactly this config."""
    doc = {
        "proxy_location": cfg.http.proxy_location,
        "http_options": {"host": cfg.http.host, "port": cfg.http.port},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": "serve.graph:app_builder",
                "runtime_env": runtime_env(cfg),
                "args": cfg.model_dump(mode="json"),
            }
        ],
    }
    head = "# Generated by `ragraph serve --export`; edit the ragraph config and export again.\n"
    return head + yaml.safe_dump(doc, sort_keys=False)
