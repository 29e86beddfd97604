"""Images: register, list, delete, the shared SIF cache."""
from __future__ import annotations

from flask import g

from portal.api.operations import answer, body, operation
from portal.db_session import backend, box, db, settings
from portal.models.images import CacheEntryPublic, CacheList, ImageCreate, ImageDeletedPublic, ImageList, ImagePublic
from portal.services import images


@operation("GET", "/images", "the caller's images (admins: all)", {200: ImageList}, (503,))
def list_images():
    rows = images.list_images(db(), settings(), backend(), g.user)
    return answer(ImageList(images=[ImagePublic.of(i) for i in rows]))


@operation("POST", "/images", "register an image (archives and registry images are converted by a Slurm job)",
           {201: ImagePublic}, (400, 403, 422, 503), body=ImageCreate,
           refuses="an image file that does not exist or the caller cannot read")
def register_image():
    img = images.register_image(db(), settings(), backend(), box(), g.user, body(ImageCreate).ref.strip())
    return answer(ImagePublic.of(img), 201)


@operation("DELETE", "/images/<int:image_id>", "delete an image (its owner or an admin); its SIF leaves the shared "
           "cache only when no other image, site image, unfinished job or service uses it", {200: ImageDeletedPublic},
           (404,))
def delete_image(image_id: int):
    done = images.delete_image(db(), settings(), g.user, image_id)
    return answer(ImageDeletedPublic(image=ImagePublic.of(done.image), sif_removed=done.sif_removed,
                                     kept_because=list(done.kept_because)))


@operation("GET", "/images/cache", "the shared SIF cache (admins: every entry; users: their images' entries)",
           {200: CacheList})
def image_cache():
    return answer(CacheList(entries=[CacheEntryPublic(**e) for e in images.cache_entries(db(), settings(), g.user)]))
