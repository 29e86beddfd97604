"""aiportal containers: image references, apptainer argv, and the shared SIF cache.

A leaf package: it imports nothing else of aiportal.

- :mod:`containers.refs`: ``parse_image_ref(text) -> ImageRef`` (pure).
- :mod:`containers.apptainer`: the one apptainer argv builder (``exec_argv``, ``job_exec_prefix``
  for batch jobs, ``health_probe_argv``, ``instance_run_argv``,
  ``build_argv``).
- :mod:`containers.cache`: ``SifCache``, SIF images keyed by content digest, converted once.
- :mod:`containers.digests`: the content digest of an image source (archive, layout, definition).
- :mod:`containers.builder`: the adapter that runs apptainer/skopeo/umoci.
- :mod:`containers.definition`: a small reader of definition files.
- :mod:`containers.errors`: ``ContainerError`` and its subclasses.
- :mod:`containers.publish`: the site's base images, from definitions to the site registry
  (``site/NAME:TAG``) and the SIF cache.
- ``definitions/``: image definitions (base image, TensorFlow, PyTorch).
"""
