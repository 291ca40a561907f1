"""Building an atlas, stage by stage in data-flow order (``pipeline.run_ingest`` runs them all)."""
