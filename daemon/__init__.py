"""aftertune.daemon: the long-running worker, its settings, CLI, ingest loop and servers."""
