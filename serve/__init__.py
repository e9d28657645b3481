"""The HTTP layer over the request flow (:mod:`flow`): the routes, each declared once with its
access level and response model (``routes``, ``routetable``, ``responses``), admission as FastAPI
dependencies (``admission``), the one mapping of flow errors to HTTP statuses and headers
(``errors``), the SSE writer (``openai``), the documents, conversations, chat-page and API-docs
routes, the stages as Serve handles or plain classes (``stages``), the graph builder and the
launcher of a local Ray and Serve, the Serve ingress and the in-process app, and the query log."""
