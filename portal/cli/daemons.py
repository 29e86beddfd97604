"""Commands of the portal host and the nodes: the database schema, the reconciler, the router,
the monitor, health checks and dev fault injection."""
from __future__ import annotations

import logging
import os

from portal.cli.client import CliError, _print_json
from portal.cli.tools import _site_settings



def _portal_settings(args):
    """The portal's own settings (with secrets: root on the portal host)."""
    from portal.errors import ConfigError
    from portal.settings import Settings
    try:
        return Settings.load(getattr(args, "config", None))
    except ConfigError as e:
        raise CliError("%s (these commands run as root on the portal host)" % e) from e


def _daemon_start(args):
    """What a portal-host daemon starts with: logging, the settings, the database at the code's
    schema revision."""
    from portal import db as dbmod
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = _portal_settings(args)
    engine = dbmod.make_engine(settings.database_url)
    dbmod.check_schema(engine)
    return settings, engine


def cmd_db_upgrade(args) -> int:
    from portal import db as dbmod
    settings = _portal_settings(args)
    engine = dbmod.make_engine(settings.database_url)
    before = dbmod.current_revision(engine)
    dbmod.upgrade(engine)
    after = dbmod.current_revision(engine)
    print("database schema: %s -> %s" % (before or "(empty)", after) if before != after
          else "database schema at %s (up to date)" % after)
    return 0


def cmd_reconcile(args) -> int:
    from portal.daemons.reconcile import Reconciler
    from slurm.backend import SlurmCli
    from storage.credentials import SecretBox
    settings, engine = _daemon_start(args)
    rec = Reconciler(engine, SlurmCli(settings.slurm_conf, settings.slurm_timeout_s, settings.cluster_name),
                     settings, SecretBox(settings.data_key))
    if args.once:
        stats = rec.cycle()
        print("%d jobs, %d updated, %d adopted, %d resubmitted, %d external, %d Slurm calls, %.3fs"
              % (stats.jobs, stats.updated, stats.adopted, stats.resubmitted, stats.external, stats.slurm_calls,
                 stats.seconds))
        return 0
    rec.run(args.interval or settings.reconcile_interval_s)
    return 0


def cmd_router(args) -> int:
    from portal.daemons import router
    settings, engine = _daemon_start(args)
    router.serve(settings, engine, args.listen or settings.router_listen)
    return 0


def _node_name(args) -> str:
    """--node, else the name Slurm gives HealthCheckProgram, else this host's short name."""
    import socket
    name = args.node or os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]
    if not name:
        raise CliError("give the node with --node NAME (Slurm sets SLURMD_NODENAME when it runs the check)")
    return name


def cmd_health_check(args) -> int:
    """Exit 0 healthy, 1 unhealthy (NHC's convention), 2 on a usage or settings error."""
    import faulthandler

    from monitor.health import format_report, run_health_check
    from monitor.probe import DEFAULT_PATH
    from portal.errors import ConfigError
    # Slurm runs HealthCheckProgram with no PATH; probes and Slurm's clients need one
    os.environ.setdefault("PATH", DEFAULT_PATH)
    logging.basicConfig(level=logging.WARNING, format="[aiportal health] %(message)s")
    try:
        config = _site_settings().health
    except ConfigError as e:
        raise CliError(str(e)) from e
    if args.timeout is not None:
        from dataclasses import replace
        try:
            config = replace(config, timeout_s=args.timeout,
                             probe_timeout_s=min(config.probe_timeout_s, args.timeout / 2))
        except ValueError as e:
            raise CliError("--timeout %s: %s" % (args.timeout, e)) from e
    node = _node_name(args)
    # the last resort, even if a thread is stuck in C code: dump stacks and exit
    faulthandler.dump_traceback_later(config.timeout_s + 10, exit=True)
    report = run_health_check(config, node, dry_run=args.dry_run)
    faulthandler.cancel_dump_traceback_later()
    if args.json:
        _print_json(report.to_dict(all_failures=args.all))
    else:
        print(format_report(report, all_failures=args.all))
    return 0 if report.healthy else 1


def cmd_fail_node(args) -> int:
    from monitor.errors import FaultError
    from monitor.faults import heal, inject
    from portal.errors import ConfigError
    logging.basicConfig(level=logging.INFO, format="[aiportal dev] %(message)s")
    try:
        config = _site_settings().health
    except ConfigError as e:
        raise CliError(str(e)) from e
    try:
        if args.heal:
            done = heal(config, args.node, args.mode)
        else:
            if not args.mode:
                raise CliError("give --mode gpu|disk|slurmd|hang (or --heal)")
            done = inject(config, args.node, args.mode)
    except FaultError as e:
        raise CliError(str(e)) from e
    for line in done:
        print(line)
    return 0


def cmd_monitor(args) -> int:
    from portal.daemons.monitor import HealthMonitor
    from slurm.backend import SlurmCli
    settings, engine = _daemon_start(args)
    mon = HealthMonitor(engine, SlurmCli(settings.slurm_conf, settings.slurm_timeout_s, settings.cluster_name), settings)
    if args.once:
        stats = mon.cycle()
        print(stats.summary())
        return 0
    mon.run(args.interval or settings.monitor_interval_s)
    return 0
