"""The built-in data stores (one module each); the interface and the registry are in
:mod:`storage.store`."""
