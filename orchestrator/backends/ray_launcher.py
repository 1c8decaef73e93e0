"""Rented nodes: `speedrun cluster up|down|status CONFIG`, a wrapper of the Ray cluster launcher.

A config for rented machines is an ordinary cluster config (backend: ray) whose `ray.launcher` (inline)
or `ray.cluster_yaml` (a file) is a Ray cluster-launcher config. `up` hands it to `ray up`
(ray.autoscaler.sdk.create_or_update_cluster), `down` to `ray down`: we make no cloud API call of
our own but `status`'s read-only look-up of the nodes through the launcher's provider. Before any, the
launcher config is read and checked (backends/ray_launcher_config.py: ray's schema, enough GPU nodes for
`nodes:`); `up` states the hourly cost and asks before it rents anything (`--yes` answers for scripts);
`--dry-run` prints what would be provisioned and its price, contacting nothing. `speedrun launch` on
such a config: backends/ray_rented.py.

    speedrun cluster up cluster_configs/ray-cluster-aws.yaml --dry-run   # the nodes and their price; contacts nothing
    speedrun cluster up cluster_configs/ray-cluster-aws.yaml             # states the cost, asks, then `ray up`
    speedrun cluster status cluster_configs/ray-cluster-aws.yaml         # the provider's nodes; the Jobs API's answer
    speedrun cluster down cluster_configs/ray-cluster-aws.yaml --yes     # `ray down`: nothing keeps billing
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from orchestrator.backends.ray_launcher_config import (hourly_cost, load_rented, provisioning_json, provisioning_table,
                                                       saved_launcher_path)
from orchestrator.cluster_config import ClusterConfig
from orchestrator.config import ConfigError

log = logging.getLogger(__name__)


def confirm_cost(cluster: ClusterConfig, path: Path, config: dict[str, Any], yes: bool, console: Console,
                 what: str) -> bool:
    """State the hourly cost of `what` and ask; --yes answers. No terminal to ask and no --yes: one sentence."""
    price = hourly_cost(cluster, config, path)
    console.print(f"{what}: Ray cluster {config['cluster_name']!r} at {price}", markup=False, highlight=False)
    if yes:
        return True
    if not sys.stdin.isatty():
        raise ConfigError(f"{path}: {what} costs {price.split(' (')[0]}; pass --yes to go ahead "
                          "(stdin is not a terminal, so no one can answer the question)")
    answer = console.input("go ahead? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


@contextlib.contextmanager
def launcher_output(console: Console):
    """Ray's launcher narrates on stdout: colours only on a terminal, plain timestamped lines in a pipe or
    file, and none of its debug lines (VINFO) unless -v."""
    from ray.autoscaler._private.cli_logger import cli_logger

    cli_logger.configure(log_style="pretty" if console.is_terminal else "record",
                         color_mode="true" if console.is_terminal else "false",
                         verbosity=1 if log.isEnabledFor(logging.DEBUG) else 0)
    yield


def provision(cluster: ClusterConfig, path: Path, config: dict[str, Any], config_path: str, console: Console) -> str:
    """`ray up` of the launcher config; the head's address."""
    from ray.autoscaler.sdk import create_or_update_cluster, get_head_node_ip

    saved = saved_launcher_path(config)
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(yaml.safe_dump(config, sort_keys=False))
    try:
        with launcher_output(console):
            create_or_update_cluster(str(saved), no_config_cache=True)
            return get_head_node_ip(str(saved))
    except (Exception, SystemExit) as e:  # the launcher aborts with SystemExit / provider errors
        raise ConfigError(f"{path}: ray up failed ({str(e).strip()[:300] or type(e).__name__}); "
                          f"its output above names the cause; retry after fixing it, or "
                          f"`speedrun cluster down {config_path} --yes` so that nothing it started keeps billing") from None


def teardown(path: Path, config: dict[str, Any], console: Console) -> None:
    """`ray down`: Ray stops on every node, and the provider releases them (on-prem: the machines stay)."""
    from ray.autoscaler.sdk import teardown_cluster

    try:
        with launcher_output(console):
            teardown_cluster(config)
    except (Exception, SystemExit) as e:
        raise ConfigError(f"{path}: ray down failed ({str(e).strip()[:300] or type(e).__name__}); "
                          "check the nodes in your provider's console so nothing keeps billing") from None


def cluster_up(config_path: str, dry_run: bool, yes: bool, console: Console) -> int:
    cluster, path, config = load_rented(config_path)
    console.print(provisioning_table(cluster, config, f"{path}: Ray cluster {config['cluster_name']!r}"))
    setup = [*config.get("initialization_commands", []), *config.get("setup_commands", []),
             *config.get("head_setup_commands", []), *config.get("head_start_ray_commands", [])]
    for line in setup:
        console.print(f"  $ {line}", markup=False, highlight=False)
    if dry_run:
        console.print(f"dry run: nothing provisioned; `speedrun cluster up {config_path}` runs `ray up` on this "
                      f"at {hourly_cost(cluster, config, path)}", markup=False, highlight=False)
        return 0
    if not confirm_cost(cluster, path, config, yes, console, "cluster up"):
        console.print("nothing was provisioned")
        return 1
    head = provision(cluster, path, config, config_path, console)
    saved = saved_launcher_path(config)
    console.print(f"cluster {config['cluster_name']!r} is up; head node {head}; it bills until "
                  f"`speedrun cluster down {config_path}`", markup=False, highlight=False)
    console.print(f"Jobs API: `speedrun launch JOB --cluster {config_path}` forwards it to {cluster.ray.address} "
                  f"while it runs; yourself: `ray dashboard --port {_port(cluster.ray.address)} "
                  f"--remote-port {remote_dashboard_port(config)} {saved}`", markup=False, highlight=False)
    return 0


def cluster_down(config_path: str, dry_run: bool, yes: bool, console: Console) -> int:
    cluster, path, config = load_rented(config_path)
    console.print(provisioning_table(cluster, config, f"{path}: would stop Ray and release these nodes"))
    if dry_run:
        console.print("dry run: nothing was torn down")
        return 0
    if not yes and sys.stdin.isatty() and console.input("stop Ray and release these nodes? [y/N] ").strip().lower() not in ("y", "yes"):
        console.print("nothing was torn down")
        return 1
    teardown(path, config, console)
    console.print(f"cluster {config['cluster_name']!r} is down")
    return 0


@dataclass
class LiveNode:
    role: str
    node_id: str
    address: str
    state: str


def live_nodes(config: dict[str, Any], path: Path) -> list[LiveNode]:
    """The cluster's nodes as its provider lists them (read-only: no bootstrap, nothing created)."""
    from ray.autoscaler._private.providers import _get_node_provider
    from ray.autoscaler.tags import TAG_RAY_NODE_KIND, TAG_RAY_NODE_STATUS

    quiet = io.StringIO()
    try:
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            provider = _get_node_provider(config["provider"], config["cluster_name"])
            nodes = []
            for node_id in provider.non_terminated_nodes({}):
                tags = provider.node_tags(node_id)
                address = provider.external_ip(node_id) or provider.internal_ip(node_id) or "-"
                nodes.append(LiveNode(tags.get(TAG_RAY_NODE_KIND, "?"), str(node_id), str(address),
                                      tags.get(TAG_RAY_NODE_STATUS, "?")))
    except Exception as e:  # noqa: BLE001  credentials, network: one sentence, not a traceback
        raise ConfigError(f"{path}: the {config['provider'].get('type')} provider could not list the nodes of "
                          f"{config['cluster_name']!r} ({type(e).__name__}: {str(e).strip()[:200]}); "
                          "check credentials and region") from None
    return sorted(nodes, key=lambda n: (n.role != "head", n.node_id))


def jobs_api_answers(address: str, timeout_s: float = 5) -> bool:
    import requests

    try:
        return requests.get(f"{address.rstrip('/')}/api/version", timeout=timeout_s).ok
    except requests.RequestException:
        return False


def cluster_status(config_path: str, dry_run: bool, console: Console, as_json: bool = False) -> int:
    """The cluster's nodes (from the launcher's provider) and whether the Jobs API answers at ray.address."""
    from dataclasses import asdict

    from orchestrator.terminal import print_json

    cluster, path, config = load_rented(config_path)
    name = config["cluster_name"]
    if dry_run and as_json:
        print_json(provisioning_json(cluster, config, path, "status"))
        return 0
    if dry_run:
        console.print(provisioning_table(cluster, config, f"{path}: Ray cluster {name!r} as configured"))
        console.print(f"dry run: no provider or cloud API was asked; `speedrun cluster status {config_path}` "
                      "lists the running nodes", markup=False, highlight=False)
        return 0
    nodes = live_nodes(config, path)
    answers = jobs_api_answers(cluster.ray.address)
    if as_json:
        rate = None if cluster.cost_per_hour is None else cluster.cost_per_hour * len(nodes)
        print_json({"config": str(path), "cluster_name": name, "nodes": [asdict(n) for n in nodes],
                    "usd_per_hour": rate, "jobs_api": {"address": cluster.ray.address, "answers": answers}})
        return 0 if nodes and answers else 1
    t = Table(title=f"{path}: Ray cluster {name!r}", title_justify="left")
    for col in ("role", "node", "address", "launcher state"):
        t.add_column(col)
    for n in nodes:
        t.add_row(n.role, n.node_id, n.address, n.state)
    if not nodes:
        t.add_row("-", "no node running", "-", "-")
    console.print(t)
    rate = "" if cluster.cost_per_hour is None else f"; ${cluster.cost_per_hour * len(nodes):,.2f}/hour while these run"
    console.print(f"{len(nodes)} node(s){rate}", markup=False, highlight=False)
    console.print(f"Jobs API at {cluster.ray.address}: {'answers' if answers else 'does not answer (not up, or not forwarded)'}",
                  markup=False, highlight=False)
    return 0 if nodes and answers else 1


def _port(address: str) -> int:
    from urllib.parse import urlparse

    return urlparse(address).port or 8265


def remote_dashboard_port(config: dict[str, Any]) -> int:
    """The head's dashboard port, as its `ray start --head` command sets it (Ray's default: 8265)."""
    for line in config.get("head_start_ray_commands", []):
        m = re.search(r"--dashboard-port[= ](\d+)", str(line))
        if m:
            return int(m.group(1))
    return 8265


def cluster_command(args, console: Console) -> int:
    """`speedrun cluster ACTION CONFIG [--dry-run] [--yes] [--json]`, dispatched from orchestrator/cli.py."""
    as_json = getattr(args, "json", False)
    if as_json and args.action in ("up", "down"):
        if not args.dry_run:
            raise ConfigError(f"--json: `cluster {args.action}` takes it only with --dry-run (ray's own output "
                              "streams while it works)")
        from orchestrator.terminal import print_json

        cluster, path, config = load_rented(args.config)
        print_json(provisioning_json(cluster, config, path, args.action))
        return 0
    if args.action == "up":
        return cluster_up(args.config, args.dry_run, args.yes, console)
    if args.action == "down":
        return cluster_down(args.config, args.dry_run, args.yes, console)
    return cluster_status(args.config, args.dry_run, console, as_json)
