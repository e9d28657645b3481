"""ragraph ingress, HTTP API, auth and the `ragraph` CLI."""
