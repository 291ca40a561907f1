"""What users touch: the Litestar HTTP API (``app``), the queries behind it (``service``) and the CLI."""
