"""The portal host's long-running processes, each a cycle on the shared run loop (``loop``):
``reconcile`` (the database in step with Slurm; it also drives the service ``controller``),
``monitor`` (node conditions, requeues, owner notifications through ``notify``) and
``router`` (the inference gateway's view of the database). Views never import them."""
