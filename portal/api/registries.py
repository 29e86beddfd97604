"""Registry accounts (checked at once, sealed at rest) and the image pickers' choices and checks."""
from __future__ import annotations

from flask import g, request

from containers.registry import HOST_PATTERN
from portal.api.operations import answer, body, operation
from portal.db_session import box, db, settings
from portal.errors import ValidationError
from portal.models.registries import ImageCheck, ImageChoices, RegistryList, RegistryLogin, RegistryPublic
from portal.services import images, registries


@operation("GET", "/registries", "the caller's registry accounts (passwords are never shown)", {200: RegistryList})
def list_registries():
    return answer(RegistryList(registries=[RegistryPublic.of(r) for r in registries.accounts(db(), g.user)]))


@operation("POST", "/registries", "add (or replace) an account at a registry; checked against it first",
           {201: RegistryPublic}, (400, 422, 503), body=RegistryLogin,
           refuses="a login the registry does not accept")
def add_registry():
    login = body(RegistryLogin)
    row = registries.login(db(), settings(), box(), g.user, login.registry, login.username, login.password)
    return answer(RegistryPublic.of(row), 201)


@operation("DELETE", "/registries/<host>", "forget the caller's account at a registry", {204: None}, (404, 422),
           params={"host": {"type": "string", "pattern": "^(?:%s)$" % HOST_PATTERN, "maxLength": 255}})
def delete_registry(host: str):
    registries.logout(db(), g.user, host)
    return "", 204


@operation("GET", "/images/choices", "what an image field offers: site base images, recent images, the "
           "repositories and tags in the caller's registries", {200: ImageChoices})
def image_choices():
    return answer(images.choices(db(), settings(), box(), g.user))


@operation("GET", "/images/check", "check an image reference as it is typed (exists, readable, cached)",
           {200: ImageCheck}, (422,), query={"ref": {"type": "string", "minLength": 1, "description": "the reference"}},
           required_query=("ref",))
def image_check():
    ref = request.args.get("ref", "")
    if not ref:
        raise ValidationError("ref", "give ?ref=docker://REGISTRY/REPO:TAG (or a path)")
    return answer(images.check_ref(db(), settings(), box(), g.user, ref))
