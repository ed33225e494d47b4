"""aftertune.store: everything durable (record schema, example store, registry, bundles). Never imports torch."""
