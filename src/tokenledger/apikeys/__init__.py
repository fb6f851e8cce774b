"""Server API keys: stored hashed, compared in constant time, scoped and revocable
(``models``, ``service``)."""
