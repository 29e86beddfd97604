"""aiportal storage package (see DESIGN.md and docs/storage.md).

What the portal calls on a data location, whatever its scheme (:mod:`storage.store`): build a
:class:`StoreContext` for the user, then :func:`check_locations`, :func:`browse_uri`,
:func:`parent`, :func:`default_root`, :func:`location_hints`, :func:`check_access`,
:func:`needs_credentials`, :func:`bind_source`. (Submodules such as ``storage.browse`` and ``storage.validate`` are
modules: the functions here are named so that they never collide with one.)
"""
from storage.store import (Checked, Entry, Listing, LocationHint, StoreContext, bind_source, browse_uri, check_access,
                           check_locations, check_uri, default_root, location_hints, NamedSource, needs_credentials, parent,
                           parse_uri, source_roots, store_for, validate_uri)

__all__ = ["Checked", "Entry", "Listing", "LocationHint", "StoreContext", "bind_source", "browse_uri", "check_access",
           "check_locations", "check_uri", "default_root", "location_hints", "NamedSource", "needs_credentials", "parent",
           "parse_uri", "source_roots", "store_for", "validate_uri"]
