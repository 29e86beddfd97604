"""Data sources: register (keys sealed at rest), list (keys masked), delete, browse a location."""
from __future__ import annotations

from flask import g, request

from portal.api.operations import answer, body, int_arg, operation
from portal.db_session import box, db
from portal.models.datasources import BrowseEntry, BrowsePage, DataSourceCreate, DataSourceList, DataSourcePublic
from portal.services import datasources


@operation("GET", "/datasources", "the caller's data sources (keys masked)", {200: DataSourceList})
def list_datasources():
    return answer(DataSourceList(datasources=[DataSourcePublic.of(r)
                                              for r in datasources.list_sources(db(), g.user)]))


@operation("POST", "/datasources", "register a data source (keys sealed at rest)", {201: DataSourcePublic},
           (400, 403, 409, 422, 503), body=DataSourceCreate,
           refuses="a name, endpoint URL, bucket list, bandwidth or worker count that does not parse, keys that do "
                   "not open each bucket (with check)")
def add_datasource():
    rec = datasources.register(db(), box(), g.user, body(DataSourceCreate))
    db().commit()
    return answer(DataSourcePublic.of(rec), 201)


@operation("DELETE", "/datasources/<name>", "delete a data source", {204: None}, (404,))
def delete_datasource(name: str):
    datasources.delete_source(db(), g.user, name)
    db().commit()
    return "", 204


@operation("GET", "/datasources/<name>/browse", "one level of a location on the data source", {200: BrowsePage},
           (400, 403, 404, 422, 503), query={"prefix": {"type": "string", "description": "s3://bucket/prefix"},
                                             "limit": {"type": "integer", "minimum": 1, "maximum": 1000},
                                             "token": {"type": "string"}})
def browse_datasource(name: str):
    prefix = request.args.get("prefix", "")
    listing = datasources.browse(db(), box(), g.user, name, prefix, int_arg("limit", 1000, 1, 1000),
                                 request.args.get("token"))
    return answer(BrowsePage(prefix=prefix, next_token=listing.next_token, entries=[
        BrowseEntry(name=e.name, uri=e.uri, is_dir=e.is_dir, size=e.size, last_modified=e.last_modified)
        for e in listing.entries]))
