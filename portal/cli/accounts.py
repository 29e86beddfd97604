"""Accounts straight on the database (root on the portal host): users, tokens, projects."""
from __future__ import annotations

import argparse
import getpass
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from portal.cli.client import CliError, _api, _print_json, _when
from portal.cli.daemons import _portal_settings



# -- admin: accounts straight on the database (root on the portal host) -------------------------

@contextmanager
def _admin_db(args) -> Iterator:
    """A session on the portal's database (settings from --config), committed at the end;
    the services' errors (invalid, conflict, not found) become CliError."""
    import sqlalchemy as sa

    from portal import db as dbmod
    from portal.errors import PortalError
    settings = _portal_settings(args)
    try:
        engine = dbmod.make_engine(settings.database_url)
    except PortalError as e:
        raise CliError(str(e)) from e
    try:
        dbmod.check_schema(engine)
        with dbmod.session_scope(engine) as session:
            yield session
    except PortalError as e:
        raise CliError(str(e)) from e
    except sa.exc.SQLAlchemyError as e:
        raise CliError("database %s: %s" % (dbmod._safe_url(settings.database_url), e.__class__.__name__ + ": "
                                            + str(e).splitlines()[0])) from e
    finally:
        engine.dispose()


def _read_password(args) -> str | None:
    """The password from --password-file or --password-stdin (one line; the line end is not part
    of it), or None when neither was given. Never from argv, never echoed."""
    if getattr(args, "password_file", None):
        try:
            text = Path(args.password_file).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise CliError("cannot read the password from %s (%s)" % (args.password_file, e)) from e
        source = args.password_file
    elif getattr(args, "password_stdin", False):
        if sys.stdin.isatty():
            text = getpass.getpass("password: ")
            if getpass.getpass("again: ") != text:
                raise CliError("the two passwords differ")
        else:
            text = sys.stdin.read()
        source = "stdin"
    else:
        return None
    password = text[:-1] if text.endswith("\n") else text
    password = password[:-1] if password.endswith("\r") else password
    if "\n" in password or "\r" in password:
        raise CliError("the password from %s has more than one line" % source)
    if not password:
        raise CliError("the password from %s is empty" % source)
    return password


def cmd_user_add(args) -> int:
    from sqlmodel import select
    from werkzeug.security import check_password_hash

    from portal.models import User
    from portal.services import accounts
    password = _read_password(args)
    with _admin_db(args) as db:
        accounts.check_unix_user(args.unix_user)
        user = db.exec(select(User).where(User.name == args.name)).first()
        if user is None:
            user = accounts.add_user(db, args.name, args.unix_user, password, admin=bool(args.admin),
                                     email=args.email)
            print("added user %s (Unix user %s%s%s)" % (user.name, user.unix_user, ", admin" if user.is_admin else "",
                                                       "" if password else "; API tokens only, no password"))
            return 0
        if not args.exists_ok:
            raise CliError("user %r already exists (add --exists-ok to leave it, or update its admin flag and "
                           "password, in place)" % args.name)
        if user.unix_user != args.unix_user:
            raise CliError("user %r exists mapped to Unix user %r, not %r; a user's Unix account is not changed "
                           "in place" % (args.name, user.unix_user, args.unix_user))
        changes = []
        if args.admin is not None and user.is_admin != args.admin:
            user.is_admin = args.admin
            db.add(user)
            changes.append("admin" if args.admin else "no longer admin")
        if password is not None and not (user.password_hash and check_password_hash(user.password_hash, password)):
            accounts.set_password(db, user, password)
            changes.append("password set")
        if args.email is not None and (user.email or "") != args.email:
            user.email = accounts.check_email(args.email)
            db.add(user)
            changes.append("email %s" % (user.email or "removed"))
        print("user %s exists: %s%s" % (user.name, ", ".join(changes) or "unchanged",
                                        " (disabled; `aiportal user enable %s`)" % user.name if user.disabled else ""))
    return 0


def cmd_user_list(args) -> int:
    from portal.models import ApiToken, utcnow
    from portal.services import accounts
    from sqlmodel import select
    with _admin_db(args) as db:
        users = accounts.list_users(db)
        now = utcnow()
        live: dict[int, int] = {}
        for t in db.exec(select(ApiToken).where(ApiToken.revoked_at.is_(None))):
            if t.expires_at is None or t.expires_at > now:
                live[t.user_id] = live.get(t.user_id, 0) + 1
        rows = [{"name": u.name, "unix_user": u.unix_user, "is_admin": u.is_admin, "disabled": u.disabled,
                 "has_password": bool(u.password_hash), "tokens": live.get(u.id, 0),
                 "created_at": u.created_at.isoformat()} for u in users]
    if args.json:
        _print_json(rows)
        return 0
    print("%-20s %-12s %-6s %-9s %-9s %-7s %s" % ("NAME", "UNIX USER", "ADMIN", "DISABLED", "PASSWORD", "TOKENS",
                                                 "CREATED"))
    for r in rows:
        print("%-20s %-12s %-6s %-9s %-9s %-7d %s"
              % (r["name"], r["unix_user"] or "-", "yes" if r["is_admin"] else "", "yes" if r["disabled"] else "",
                 "yes" if r["has_password"] else "no", r["tokens"], _when(r["created_at"])))
    return 0


def cmd_user_passwd(args) -> int:
    from portal.services import accounts
    password = _read_password(args)
    with _admin_db(args) as db:
        accounts.set_password(db, accounts.get_user(db, args.name), password)
    print("password of %s changed (its web sessions end)" % args.name)
    return 0


def cmd_user_disable(args) -> int:
    from portal.services import accounts
    with _admin_db(args) as db:
        user = accounts.get_user(db, args.name)
        was = user.disabled
        user.disabled = args.disable
        db.add(user)
    if args.disable:
        print("user %s %s (its tokens and web sessions no longer work)" % (args.name, "stays disabled" if was
                                                                          else "disabled"))
    else:
        print("user %s %s" % (args.name, "enabled" if was else "was not disabled"))
    return 0


def _token_rows(tokens) -> list[dict]:
    return [{"id": t.id, "name": t.name, "prefix": t.prefix, "created_at": t.created_at.isoformat(),
             "last_used_at": t.last_used_at.isoformat() if t.last_used_at else None,
             "expires_at": t.expires_at.isoformat() if t.expires_at else None,
             "revoked": t.revoked_at is not None, "scopes": t.scopes.split() if t.scopes else None,
             "service_id": t.service_id} for t in tokens]


def cmd_token_create(args) -> int:
    if args.user:
        from portal.services import accounts
        with _admin_db(args) as db:
            user = accounts.get_user(db, args.user)
            if user.disabled:
                raise CliError("user %s is disabled; `aiportal user enable %s` first" % (user.name, user.name))
            token, rec = accounts.create_token(db, user, args.name or "", args.expires_days, args.scopes,
                                               args.service)
            rec_id, expires = rec.id, rec.expires_at
    else:
        req = {"name": args.name or "", "expires_days": args.expires_days}
        if args.scopes:
            req["scopes"] = args.scopes
        if args.service:
            req["service"] = args.service
        ans = _api(args, "POST", "/tokens", req)
        token, rec_id, expires = ans["token"], ans["id"], None
    print(token)
    sys.stdout.flush()
    print("aiportal: token %s created%s; it is not shown again" % (
        rec_id, " (expires %s)" % _when(expires.isoformat()) if expires else ""), file=sys.stderr)
    return 0


def cmd_token_list(args) -> int:
    if args.user:
        from portal.services import accounts
        with _admin_db(args) as db:
            rows = _token_rows(accounts.list_tokens(db, accounts.get_user(db, args.user)))
    else:
        rows = _api(args, "GET", "/tokens")["tokens"]
    if args.json:
        _print_json(rows)
        return 0
    print("%-5s %-16s %-16s %-17s %-17s %-17s %-8s %s" % ("ID", "NAME", "PREFIX", "CREATED", "LAST USED", "EXPIRES",
                                                          "REVOKED", "SCOPES"))
    for t in rows:
        scopes = " ".join(t.get("scopes") or ()) or "full access"
        if t.get("service_id"):
            scopes += " (one service)"
        print("%-5s %-16s %-16s %-17s %-17s %-17s %-8s %s" % (
            t["id"], t["name"][:16] or "-", t["prefix"] + "...", _when(t["created_at"]), _when(t["last_used_at"]),
            _when(t["expires_at"]), "yes" if t["revoked"] else "", scopes))
    return 0


def cmd_token_revoke(args) -> int:
    if args.user:
        from portal.errors import NotFoundError
        from portal.models import ApiToken
        from portal.services import accounts
        with _admin_db(args) as db:
            user = accounts.get_user(db, args.user)
            rec = db.get(ApiToken, args.id)
            if rec is None or rec.user_id != user.id:
                raise NotFoundError("user %s has no token %d (`aiportal token list --user %s`)"
                                    % (user.name, args.id, user.name))
            accounts.revoke_token(db, user, args.id)
    else:
        _api(args, "DELETE", "/tokens/%d" % args.id)
    print("token %d revoked" % args.id)
    return 0


def cmd_project_add(args) -> int:
    from sqlmodel import select

    from portal.models import Project
    from portal.models.accounts import ProjectCreate
    from portal.models.common import parse
    from portal.services import accounts
    with _admin_db(args) as db:
        members = [accounts.get_user(db, name) for name in args.member]
        project = db.exec(select(Project).where(Project.name == args.name)).first()
        if project is None:
            project = accounts.add_project(db, parse(ProjectCreate, {
                "name": args.name, "description": args.description or "", "slurm_account": args.slurm_account}))
            what = "added project %s" % project.name
        elif not args.exists_ok:
            raise CliError("project %r already exists (add --exists-ok to add members to it)" % args.name)
        else:
            if args.slurm_account is not None and project.slurm_account != args.slurm_account:
                project.slurm_account = args.slurm_account
                db.add(project)
            what = "project %s exists" % project.name
        for user in members:
            accounts.add_member(db, project, user)
    print("%s (Slurm account %s; members added: %s)" % (what, project.slurm_account or "-",
                                                        ", ".join(args.member) or "none"))
    return 0



def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="portal.toml (default: $AIPORTAL_CONFIG or /etc/aiportal/portal.toml)")


def _add_password(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--password-file", metavar="FILE", help="read the password from FILE (one line)")
    g.add_argument("--password-stdin", action="store_true", help="read the password from stdin (one line)")
