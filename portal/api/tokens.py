"""API tokens: list, create (shown once), revoke."""
from __future__ import annotations

from flask import g

from portal.api.operations import answer, body, operation
from portal.db_session import db
from portal.models.accounts import TokenCreate, TokenCreated, TokenList, TokenPublic
from portal.services import accounts


@operation("GET", "/tokens", "the caller's API tokens (never the tokens themselves)", {200: TokenList})
def list_tokens():
    return answer(TokenList(tokens=[TokenPublic.of(t) for t in accounts.list_tokens(db(), g.user)]))


@operation("POST", "/tokens", "create an API token (shown once)", {201: TokenCreated}, (400, 422),
           body=TokenCreate, body_required=False, refuses="a service that is not one of the caller's")
def create_token():
    req = body(TokenCreate, required=False)
    token, rec = accounts.create_token(db(), g.user, req.name, req.expires_days, req.scopes, req.service)
    db().commit()
    return answer(TokenCreated(id=rec.id, token=token, prefix=rec.prefix), 201)


@operation("DELETE", "/tokens/<int:token_id>", "revoke a token", {204: None}, (404,))
def revoke_token(token_id: int):
    accounts.revoke_token(db(), g.user, token_id)
    db().commit()
    return "", 204
