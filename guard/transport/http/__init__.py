"""HTTP transport: the Prometheus endpoint and the /flags page of flagged predictions."""
