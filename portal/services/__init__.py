"""Use cases: what the web form, the API and the CLI do, independent of how they are asked."""
