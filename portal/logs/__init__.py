"""A job's log: read and followed over SSH as the job's user (``tail``), streamed to browsers
and the CLI as Server-Sent Events (``stream``), its progress lines drawn as a plot (``plot``)."""
