"""OpenAI's embeddings API (``/v1/embeddings``), over the embedding core (:mod:`server.embeddings`)."""
