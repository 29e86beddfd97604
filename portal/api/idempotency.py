"""The views' side of ``Idempotency-Key`` (the rules: :mod:`portal.services.idempotency`).

A create view hands :func:`idempotent` two functions: ``run(resource_id)`` does the request
(creating its job or service under ``resource_id``, or a fresh id when no key was sent) and
answers it; ``stored(resource_id)`` answers for what a request stored under that id, if
anything, and says whether it is settled (a job past ``SUBMITTING``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import sqlalchemy as sa
from flask import Response, current_app, g, request

from portal.db_session import db, settings
from portal.models import utcnow
from portal.services import idempotency as idem


@dataclass(frozen=True)
class Stored:
    """What a request stored under a reserved id, as the answer to it."""

    response: Response
    settled: bool = True


def _send(answer: idem.Answer, replayed: bool) -> Response:
    resp = Response(answer.body, status=answer.status, mimetype="application/json")
    if answer.location:
        resp.headers["Location"] = answer.location
    if replayed:
        resp.headers["Idempotent-Replayed"] = "true"
    return resp


def _answer_of(resp: Response) -> idem.Answer:
    return idem.Answer(resp.status_code, resp.get_data(as_text=True), resp.headers.get("Location"))


def idempotent(run: Callable[[str | None], Response], stored: Callable[[str], Stored | None]) -> Response:
    """Answer a create request, at most once per ``Idempotency-Key`` (none sent: just ``run``)."""
    raw = request.headers.get(idem.HEADER)
    if raw is None:
        return run(None)
    key = idem.check_key(raw)
    body = request.get_json(silent=True)
    digest = idem.request_sha256(request.method, request.path, body if body is not None else request.get_data())
    now = utcnow()
    claim = idem.claim(db(), g.user, key, digest, now, settings().idempotency_in_flight_s)
    if claim.answer is not None:
        return _send(claim.answer, replayed=True)
    row = claim.record
    if not claim.run:
        found = stored(row.resource_id)
        if found is not None and (found.settled or claim.lapsed):
            # its request answered no one (still finishing, or killed): what it stored is the answer
            return _send(idem.record(db(), row, _answer_of(found.response)), replayed=True)
        if found is not None or not claim.lapsed or not idem.take_over(db(), row, now):
            raise idem.KeyInFlight()
    try:
        resp = run(row.resource_id)
    except sa.exc.IntegrityError:
        db().rollback()
        if stored(row.resource_id) is not None:
            raise idem.KeyInFlight() from None     # a request that took the key over stored it first
        idem.release(db(), row)
        raise
    except Exception as e:
        db().rollback()
        if stored(row.resource_id) is None:
            idem.release(db(), row)                 # nothing was made: a retry runs it again
            raise
        # made, then failed (e.g. sbatch refused: the job is FAILED): that answer is the key's
        resp = current_app.make_response(current_app.handle_user_exception(e))
    kept = idem.record(db(), row, _answer_of(resp))
    return resp if kept.body == resp.get_data(as_text=True) else _send(kept, replayed=True)


#: the header, as a create operation declares it (``operation(..., headers=KEY_HEADER)``)
KEY_HEADER = {idem.HEADER: {"description": idem.HEADER_DOC, "schema": idem.HEADER_SCHEMA}}
