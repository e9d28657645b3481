"""The HTTP ingress: the routes (declared once), admission, the request flow (``pipeline``: domain
requests in, domain errors out; ``errors`` maps them to statuses), the OpenAI wire format, the
documents, conversations and chat-page routes, the graph builder and the launcher of a local Ray
and Serve, the in-process app, metrics and the query log."""
